"""Embeddings from any OpenAI-compatible server (OpenAI, vLLM, TEI, Ollama, LiteLLM, …).

Synchronous on purpose: embedding runs in Celery workers, never on an event loop. The SDK does
not retry (``max_retries=0``): a transient :class:`EmbedderError` goes back to the task, which
retries the whole batch with backoff, so one policy governs retries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import openai

from knowledge.embedders.base import EmbedderError, unit_vector
from tenants.outbound import guarded_transport

DEFAULT_BATCH_SIZE = 64  # texts per request: well under every server's limit (OpenAI's is 2048)
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_MAX_INPUT_TOKENS = 512  # what most self-hosted embedding models (BGE, E5, GTE) accept
CONNECT_TIMEOUT_SECONDS = 5.0
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})  # plus every 5xx


class OpenAICompatEmbedder:
    """``POST {base_url}/embeddings`` in batches of ``batch_size``.

    ``send_dimensions`` passes ``dimensions`` to the server, for models that can shorten their
    vectors (OpenAI's text-embedding-3); vLLM and TEI reject the parameter for fixed-size
    models, so by default it is not sent and the answer is only checked against ``dimensions``.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        dimensions: int,
        api_key: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout_s: float = DEFAULT_TIMEOUT_SECONDS,
        send_dimensions: bool = False,
        max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.send_dimensions = send_dimensions
        self.max_input_tokens = max_input_tokens
        self.key = f"openai:{self.base_url}:{model}:{dimensions}"
        self._label = f"The embedding server at {self.base_url}"
        # httpx clients are thread-safe: one client (and connection pool) serves every thread.
        self._client = openai.OpenAI(
            base_url=self.base_url,
            # Self-hosted servers (vLLM, TEI, Ollama) take any key; the SDK insists on one.
            api_key=api_key or "unused",
            timeout=openai.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_SECONDS, timeout_s)),
            max_retries=0,
            # Every connection (redirects included) resolved, checked and pinned: tenants.outbound.
            http_client=openai.DefaultHttpxClient(transport=guarded_transport(library="httpx2")),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(self._embed_batch(texts[start : start + self.batch_size]))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self._embed_batch([text])[0]

    def _embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        # OpenAI rejects empty strings outright; a blank text has no meaning to embed anyway.
        batch = [text if text.strip() else " " for text in texts]
        options: dict[str, Any] = {"dimensions": self.dimensions} if self.send_dimensions else {}
        try:
            response = self._client.embeddings.create(model=self.model, input=batch, **options)
        except openai.OpenAIError as error:
            raise self._translate(error) from error
        except ValueError as error:  # the SDK's own check: an answer without data
            raise EmbedderError(f"{self._label} returned no embeddings: {error}", is_transient=False) from error
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(batch):
            raise EmbedderError(
                f"{self._label} returned {len(data)} embeddings for {len(batch)} texts.", is_transient=False
            )
        vectors = []
        for item in data:
            vector = item.embedding
            if len(vector) != self.dimensions:
                hint = "." if self.send_dimensions else ", or enable 'send_dimensions' if the model can shorten them."
                raise EmbedderError(
                    f"{self._label} returned vectors of {len(vector)} dimensions for model {self.model!r}, but the "
                    f"knowledge base is configured for {self.dimensions}. Set 'dimensions' to {len(vector)}{hint}",
                    is_transient=False,
                )
            if not all(math.isfinite(value) for value in vector):
                raise EmbedderError(f"{self._label} returned a vector with NaN or infinite values.", is_transient=False)
            vectors.append(unit_vector(vector))
        return vectors

    def _translate(self, error: openai.OpenAIError) -> EmbedderError:
        if isinstance(error, openai.APITimeoutError):
            return EmbedderError(f"{self._label} did not answer within {self.timeout_s:g} s.", is_transient=True)
        if isinstance(error, openai.APIConnectionError):
            return EmbedderError(f"Could not connect to {self._label}: {error.__cause__ or error}", is_transient=True)
        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            message = _error_message(error)
            if status == 429:
                return EmbedderError(f"{self._label} is rate limiting requests: {message}", is_transient=True)
            if status >= 500 or status in TRANSIENT_STATUSES:
                return EmbedderError(f"{self._label} failed with HTTP {status}: {message}", is_transient=True)
            if status in (401, 403):
                return EmbedderError(
                    f"{self._label} refused the API key (HTTP {status}): {message}", is_transient=False
                )
            if status == 404:
                return EmbedderError(
                    f"{self._label} does not know model {self.model!r} or has no embeddings endpoint (HTTP 404): "
                    f"{message}",
                    is_transient=False,
                )
            return EmbedderError(f"{self._label} rejected the request (HTTP {status}): {message}", is_transient=False)
        # A malformed answer (openai.APIResponseValidationError) will be malformed again.
        return EmbedderError(f"{self._label} failed: {error}", is_transient=False)


def _error_message(error: openai.APIStatusError) -> str:
    """The server's own message: OpenAI's ``{"error": {"message": …}}``, vLLM's flat object, or the SDK's."""
    body = error.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and (inner.get("message") or inner.get("detail")):
            return str(inner.get("message") or inner.get("detail"))
        if isinstance(inner, str):
            return inner
    return error.message
