"""Question and word embeddings for the semantic layer, with per-process LRU copies."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

SEMANTIC_EMBEDDER = {"kind": "local"}  # the verification's thresholds were measured on this model
EMBEDDING_DIMENSIONS = 384
QUESTION_VECTORS_CACHED = 1024  # per process: a lookup's miss is followed by a store of the same question
WORD_VECTORS_CACHED = 8192  # per process: ~12 MB; a support bot's vocabulary is far smaller


class _LRU:
    """A small thread-safe LRU of vectors (embedding runs in worker threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def put(self, key: str, value: np.ndarray) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_question_vectors = _LRU(QUESTION_VECTORS_CACHED)
_word_vectors = _LRU(WORD_VECTORS_CACHED)


def _embedder() -> Any:
    from knowledge.embedders import get_embedder

    return get_embedder(SEMANTIC_EMBEDDER)


def embedder_key() -> str:
    """Names the semantic layer's model in its keys: vectors of two models never mix."""
    return _embedder().key


def question_vectors_clear(*, questions: bool = True, words: bool = True) -> None:
    """Forget this process's copies of question and word vectors."""
    if questions:
        _question_vectors.clear()
    if words:
        _word_vectors.clear()


def question_vector(question: str) -> np.ndarray:
    """The question's unit embedding (float32); blocking: call it from a thread in async code."""
    cached = _question_vectors.get(question)
    if cached is None:
        cached = np.asarray(_embedder().embed_query(question), dtype=np.float32)
        _question_vectors.put(question, cached)
    return cached


def word_vectors(words: Iterable[str]) -> dict[str, np.ndarray]:
    """Unit embeddings of single words, from the process cache or one batch of the model."""
    found: dict[str, np.ndarray] = {}
    missing: list[str] = []
    for word in dict.fromkeys(words):
        vector = _word_vectors.get(word)
        if vector is None:
            missing.append(word)
        else:
            found[word] = vector
    if missing:
        for word, vector in zip(missing, _embedder().embed_documents(missing), strict=True):
            found[word] = np.asarray(vector, dtype=np.float32)
            _word_vectors.put(word, found[word])
    return found
