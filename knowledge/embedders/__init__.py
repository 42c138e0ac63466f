"""Embedders: texts to unit vectors, from the bundled local model or any OpenAI-compatible server.

Importing this package is cheap; torch and the local model load on the first embedding.
"""

from knowledge.embedders.base import Embedder, EmbedderError
from knowledge.embedders.registry import (
    SUPPORTED_DIMENSIONS,
    embedder_dimensions,
    get_embedder,
    validate_embedder_config,
)


def warm_up_local_embedder() -> None:
    """Load the bundled model now (a process that will embed questions calls this at start)."""
    from knowledge.embedders.local import _load_model

    _load_model()


__all__ = [
    "SUPPORTED_DIMENSIONS",
    "Embedder",
    "EmbedderError",
    "embedder_dimensions",
    "get_embedder",
    "validate_embedder_config",
    "warm_up_local_embedder",
]
