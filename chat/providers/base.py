"""The provider interface: one request type, three stream events, one error family.

A provider turns a :class:`ChatRequest` into an async stream of events:

* :class:`Delta` — a piece of answer text, in order;
* :class:`Citation` — a knowledge source the answer quoted (only providers that know their sources emit it);
* :class:`Usage` — exactly one, last: token counts, why generation stopped, who answered.

Failures are :class:`ProviderError` subclasses. Each says whether another target may be tried
(``is_retryable``); the route (``chat.providers.routing``) decides what to do with that. They
subclass :class:`~tenants.errors.ParleyError`, so the API's one exception handler renders them in
the OpenAI error shape without special cases.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from tenants.errors import ParleyError

# ---------------------------------------------------------------------------------------------
# Request


@dataclass(frozen=True, slots=True)
class Source:
    """A retrieved knowledge passage the answer may draw on (``id`` is the chunk's id)."""

    id: str
    title: str
    text: str
    document_id: int | None = None
    page: int | None = None
    heading: str = ""


@dataclass(slots=True)
class ChatRequest:
    """One chat completion to produce.

    ``messages`` are OpenAI-style ``{"role", "content"}`` dicts, system prompt first. ``sources``
    are the passages retrieved for this turn: the local responder answers from them; LLM providers
    ignore the field, because the engine has already written them into the prompt.
    ``conversation_id`` keys replica affinity (a conversation's prompt prefix is cached on the
    replica that served it before). ``timeout`` is the most seconds to wait for the first token,
    and then between two tokens; ``None`` leaves it to the provider's configured default.
    """

    messages: list[dict[str, Any]]
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    user: str | None = None
    conversation_id: str | None = None
    timeout: float | None = None
    sources: list[Source] = field(default_factory=list)
    # False when nobody watches the tokens arrive (a non-streamed API call): no artificial pacing.
    is_streamed: bool = True

    @property
    def affinity_key(self) -> str | None:
        return self.conversation_id or self.user


# ---------------------------------------------------------------------------------------------
# Stream events


@dataclass(frozen=True, slots=True)
class Delta:
    text: str


@dataclass(frozen=True, slots=True)
class Citation:
    """``index`` is the ``[n]`` marker used in the answer text; ``quote`` is the quoted text."""

    index: int
    source_id: str
    title: str
    quote: str


@dataclass(frozen=True, slots=True)
class Usage:
    """The last event of every successful stream.

    ``provider`` is the kind of provider (``local``, ``openai``, ``vllm_pool``) and ``model`` the
    model that answered; ``endpoint`` the replica, for pools. ``target`` and ``failovers`` are
    filled in by the route: which of its targets answered, and how many failed before it.
    ``is_estimated`` is true when the token counts are our estimate rather than the server's.
    """

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    provider: str
    model: str
    target: str | None = None
    failovers: int = 0
    endpoint: str | None = None
    is_estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


StreamEvent = Delta | Citation | Usage


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer: what :meth:`Provider.complete` returns."""

    text: str
    usage: Usage
    citations: tuple[Citation, ...] = ()


# ---------------------------------------------------------------------------------------------
# Errors


# The ``name`` of the user-role message that carries a turn's retrieved sources (chat.engine): data
# for the model, not the user's words (the local responder does not take it for the question).
SOURCES_MESSAGE_NAME = "sources"


class ProviderError(ParleyError):
    """A provider could not produce (or finish) an answer.

    ``is_retryable``: another target may succeed where this one failed (the failure is the
    target's, not the request's). The route fills in ``target`` (the name of the target that
    failed) and ``failovers``.
    """

    status_code = 502
    error_type = "api_error"
    code = "provider_error"
    is_retryable = False

    def __init__(
        self,
        message: str,
        *,
        is_retryable: bool | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message, code=code, status_code=status_code, headers=headers, param=param)
        if is_retryable is not None:
            self.is_retryable = is_retryable
        self.target: str | None = None
        self.failovers = 0

    @property
    def outcome(self) -> str:
        """The label this failure carries in metrics and logs."""
        return _OUTCOMES.get(type(self), "error")


class RateLimited(ProviderError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    is_retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        headers = kwargs.pop("headers", None) or {}
        if retry_after is not None:
            headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after))))
        super().__init__(message, headers=headers, **kwargs)
        self.retry_after = retry_after


class Unavailable(ProviderError):
    """5xx, refused or dropped connections, no healthy replica, open circuits."""

    status_code = 503
    code = "provider_unavailable"
    is_retryable = True


class Timeout(ProviderError):
    status_code = 504
    code = "provider_timeout"
    is_retryable = True


class BadRequest(ProviderError):
    """The provider rejected the request. Not retryable unless the rejection blames the target."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextTooLong(BadRequest):
    code = "context_length_exceeded"


class StreamInterrupted(ProviderError):
    """The answer failed after tokens had been streamed: terminal, never retried.

    ``cause`` is the underlying error; ``text`` what had been streamed before it broke.
    """

    status_code = 502
    code = "stream_interrupted"

    def __init__(self, message: str, *, cause: ProviderError, text: str = "") -> None:
        super().__init__(message, is_retryable=False)
        self.cause = cause
        self.text = text


_OUTCOMES: dict[type, str] = {
    RateLimited: "rate_limited",
    Unavailable: "unavailable",
    Timeout: "timeout",
    BadRequest: "bad_request",
    ContextTooLong: "context_too_long",
    StreamInterrupted: "interrupted",
}


# ---------------------------------------------------------------------------------------------
# Provider


class Provider(abc.ABC):
    """Something that answers chat requests. Subclasses implement :meth:`stream`.

    Instances hold connection pools: build them once (``chat.providers.registry`` caches them)
    and use them from the event loop that first used them.
    """

    kind: str = "provider"

    @abc.abstractmethod
    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        """Deltas (and citations) in order, then exactly one Usage; or a ProviderError.

        Consume it inside ``contextlib.aclosing`` so an abandoned stream releases its connection.
        """

    async def complete(self, request: ChatRequest) -> Completion:
        """The whole answer at once, collected from :meth:`stream`."""
        return await collect(self.stream(request))

    async def aclose(self) -> None:  # noqa: B027 — optional hook, most providers hold nothing
        """Release connections and background tasks."""


async def collect(events: AsyncGenerator[StreamEvent, None]) -> Completion:
    parts: list[str] = []
    citations: list[Citation] = []
    usage: Usage | None = None
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Citation):
                citations.append(event)
            else:
                usage = event
    if usage is None:
        raise Unavailable("The provider's stream ended without reporting usage.")
    return Completion(text="".join(parts), usage=usage, citations=tuple(citations))


# ---------------------------------------------------------------------------------------------
# Token estimates

_TOKEN_PIECE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_CHARS_PER_TOKEN_IN_LONG_WORDS = 4  # BPE vocabularies split long or rare words every ~4 characters


def estimate_tokens(text: str) -> int:
    """Roughly how many tokens a BPE tokenizer makes of ``text`` (within ~15% for English prose)."""
    count = 0
    for piece in _TOKEN_PIECE.findall(text):
        count += 1 if len(piece) <= 6 else math.ceil(len(piece) / _CHARS_PER_TOKEN_IN_LONG_WORDS)
    return count


MESSAGE_OVERHEAD_TOKENS = 4  # role markers and separators per chat message (OpenAI's chat format)


def message_text(message: dict[str, Any]) -> str:
    """The text of a message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(message_text(message)) + MESSAGE_OVERHEAD_TOKENS for message in messages)
