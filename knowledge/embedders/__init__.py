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

__all__ = [
    "SUPPORTED_DIMENSIONS",
    "Embedder",
    "EmbedderError",
    "embedder_dimensions",
    "get_embedder",
    "validate_embedder_config",
]
