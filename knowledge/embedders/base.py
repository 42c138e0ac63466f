"""What every embedder is: the :class:`Embedder` protocol, its one error type, and vector helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable


class EmbedderError(Exception):
    """Embedding failed. ``is_transient``: worth retrying later (timeouts, 429, 5xx, connection errors).

    A non-transient error (bad configuration, a 4xx answer, vectors of the wrong size) fails the
    same way on every retry; the ingestion task records it instead of retrying.
    """

    def __init__(self, message: str, *, is_transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.is_transient = is_transient


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors. Implementations are thread-safe and shared per process."""

    key: str  # stable identity of model + configuration (no secrets): part of embedding cache keys
    dimensions: int
    max_input_tokens: int  # longer inputs are truncated by the model or rejected by the server

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        """One unit vector per text, in order; batched internally."""
        ...

    def embed_query(self, text: str) -> list[float]:
        """The unit vector of a search query."""
        ...


def unit_vector(vector: Sequence[float]) -> list[float]:
    """``vector`` scaled to length 1 (a zero vector stays zero: it has no direction to keep)."""
    norm = math.sqrt(math.fsum(value * value for value in vector))
    if norm == 0.0:
        return [0.0] * len(vector)
    return [value / norm for value in vector]
