"""The one input contract of a chat turn, shared by every transport.

The OpenAI API (at the ASGI edge and through Django), the REST messages endpoint, the widget and
WebSocket frames each parse their wire format with these functions, so the same input is accepted
or refused with the same error everywhere. Types are strict: no string becomes a boolean, no number
a string; text is refused when PostgreSQL could not store it (NUL, lone surrogates); sizes and
counts are bounded. (JSON nesting is bounded before this, by ``tenants.json_input.json_parse``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from chat.services import validate_generation
from tenants.errors import ValidationFailed
from tenants.json_input import text_refusal

ROLES = ("system", "user", "assistant", "developer")
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 32_000  # the new message
MAX_EXCHANGE_CHARS = 400_000  # all messages of a stateless request together
MAX_MODEL_CHARS = 100
MAX_USER_CHARS = 100
MAX_NAME_CHARS = 64
MAX_STOP_SEQUENCES = 4
TITLE_MAX_CHARS = 200  # a conversation's title: its first message, cut here (the column's size)

_CHAT_COMPLETION_FIELDS = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "n",
        "logprobs",
    }
)
_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})
_MESSAGE_POST_FIELDS = frozenset({"content", "stream"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True, slots=True)
class ChatCompletionInput:
    """A validated ``POST /v1/chat/completions`` body."""

    model: str  # a bot's public id
    messages: tuple[ChatMessage, ...]  # the last one is the user's new message
    is_streamed: bool
    include_usage: bool
    overrides: dict[str, Any]  # generation parameters, checked by chat.services.validate_generation
    user: str | None  # the caller's own end-user id


@dataclass(frozen=True, slots=True)
class MessageInput:
    """A validated new message for a stored conversation (REST, widget, WebSocket)."""

    content: str
    is_streamed: bool


def conversation_title(content: str) -> str:
    """A conversation's title from its first message: the one rule for every transport."""
    return " ".join(content.split())[:TITLE_MAX_CHARS]


def _object(data: Any, fields: frozenset[str], *, param: str | None = None) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationFailed(f"{param or 'The body'} must be a JSON object.", param=param)
    unknown = sorted(set(data) - fields)
    if unknown:
        name = f"{param}.{unknown[0]}" if param else unknown[0]
        raise ValidationFailed(f"{name}: Unknown field.", param=name)  # as every other endpoint says it
    return data


def text_field(value: Any, *, param: str, max_chars: int, allow_empty: bool = False) -> str:
    """A string field: a string (never coerced), storable, within ``max_chars``."""
    if not isinstance(value, str):
        raise ValidationFailed(f"{param} must be a string.", param=param)
    if not allow_empty and not value.strip():
        raise ValidationFailed(f"{param} must not be empty.", param=param)
    if len(value) > max_chars:
        raise ValidationFailed(f"{param} is longer than {max_chars} characters.", param=param, code="message_too_long")
    reason = text_refusal(value)
    if reason is not None:
        raise ValidationFailed(f"{param} {reason}.", param=param, code="invalid_text")
    return value


def _boolean(value: Any, *, param: str) -> bool:
    if not isinstance(value, bool):
        raise ValidationFailed(f"{param} must be true or false.", param=param)
    return value


def _number(value: Any, *, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationFailed(f"{param} must be a number.", param=param)
    return float(value)


def _integer(value: Any, *, param: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(f"{param} must be an integer.", param=param)
    if value < minimum:
        raise ValidationFailed(f"{param} must be at least {minimum}.", param=param)
    return value


def message_content(value: Any, *, param: str = "content") -> str:
    """The user's new message: a non-empty string of at most ``MAX_MESSAGE_CHARS``."""
    return text_field(value, param=param, max_chars=MAX_MESSAGE_CHARS)


def message_input_parse(data: Any, *, allow_stream: bool = True) -> MessageInput:
    """``{"content": "...", "stream": false}``: a new message of a stored conversation. The widget
    always streams (``allow_stream=False``: the field is unknown there)."""
    fields = _MESSAGE_POST_FIELDS if allow_stream else frozenset({"content"})
    body = _object(data, fields)
    if "content" not in body:
        raise ValidationFailed("content is required.", param="content")
    content = message_content(body["content"])
    is_streamed = _boolean(body["stream"], param="stream") if "stream" in body else False
    return MessageInput(content=content, is_streamed=is_streamed)


def _chat_message(item: Any, index: int) -> ChatMessage:
    param = f"messages.{index}"
    body = _object(item, _MESSAGE_FIELDS, param=param)
    role = body.get("role")
    if role not in ROLES:
        raise ValidationFailed(f"{param}.role must be one of {', '.join(ROLES)}.", param=f"{param}.role")
    if "name" in body:
        text_field(body["name"], param=f"{param}.name", max_chars=MAX_NAME_CHARS)
    content = body.get("content")
    if isinstance(content, list):  # OpenAI's text parts
        texts = []
        for number, part in enumerate(content):
            part_param = f"{param}.content.{number}"
            part_body = _object(part, frozenset({"type", "text"}), param=part_param)
            if part_body.get("type") != "text":
                raise ValidationFailed(f"{part_param}.type must be 'text'.", param=f"{part_param}.type")
            texts.append(
                text_field(
                    part_body.get("text"), param=f"{part_param}.text", max_chars=MAX_EXCHANGE_CHARS, allow_empty=True
                )
            )
        content = "".join(texts)
    else:
        content = text_field(content, param=f"{param}.content", max_chars=MAX_EXCHANGE_CHARS, allow_empty=True)
    return ChatMessage(role=role, content=content)


def chat_completion_parse(data: Any) -> ChatCompletionInput:
    """A ``POST /v1/chat/completions`` body, validated; ValidationFailed names the first fault."""
    body = _object(data, _CHAT_COMPLETION_FIELDS)
    if "model" not in body:
        raise ValidationFailed("model is required.", param="model")
    model = text_field(body["model"], param="model", max_chars=MAX_MODEL_CHARS)
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ValidationFailed("messages must be a non-empty list.", param="messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise ValidationFailed(f"messages has more than {MAX_MESSAGES} items.", param="messages")
    messages = tuple(_chat_message(item, index) for index, item in enumerate(raw_messages))
    if sum(len(message.content) for message in messages) > MAX_EXCHANGE_CHARS:
        raise ValidationFailed(
            f"messages are longer than {MAX_EXCHANGE_CHARS} characters together.",
            param="messages",
            code="message_too_long",
        )
    last = len(messages) - 1
    if messages[last].role != "user":
        raise ValidationFailed("The last message must be the user's.", param=f"messages.{last}.role")
    message_content(messages[last].content, param=f"messages.{last}.content")
    is_streamed = _boolean(body["stream"], param="stream") if body.get("stream") is not None else False
    include_usage = False
    if body.get("stream_options") is not None:
        options = _object(body["stream_options"], frozenset({"include_usage"}), param="stream_options")
        if "include_usage" in options:
            include_usage = _boolean(options["include_usage"], param="stream_options.include_usage")
    user = None
    if body.get("user") is not None:
        user = text_field(body["user"], param="user", max_chars=MAX_USER_CHARS)
        if user != user.strip():
            raise ValidationFailed("user must not start or end with spaces.", param="user")
    if body.get("n") is not None and _integer(body["n"], param="n", minimum=1) != 1:
        raise ValidationFailed("n must be 1: one answer per request.", param="n")
    if body.get("logprobs") is not None and _boolean(body["logprobs"], param="logprobs"):
        raise ValidationFailed("logprobs are not supported.", param="logprobs")
    return ChatCompletionInput(
        model=model,
        messages=messages,
        is_streamed=is_streamed,
        include_usage=include_usage,
        overrides=_generation_overrides(body),
        user=user,
    )


def _generation_overrides(body: dict[str, Any]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for name in _FLOAT_FIELDS:
        if body.get(name) is not None:
            raw[name] = _number(body[name], param=name)
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        if body.get(name) is not None and "max_tokens" not in raw:
            raw["max_tokens"] = _integer(body[name], param=name, minimum=1)
    if body.get("seed") is not None:
        raw["seed"] = _integer(body["seed"], param="seed", minimum=0)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES:
            raise ValidationFailed(
                f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings.", param="stop"
            )
        raw["stop"] = [text_field(item, param="stop", max_chars=MAX_USER_CHARS, allow_empty=True) for item in stops]
    try:
        return validate_generation(raw)
    except ValidationFailed as error:  # name the request's field, not the bot setting's
        param = (error.param or "").removeprefix("generation.")
        raise ValidationFailed(error.message.replace("generation.", ""), param=param or None) from None
