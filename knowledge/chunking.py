"""Structure-aware chunking: document sections into pieces that fit the embedder, measured in real tokens.

Short sections under the same heading (and on the same page) are packed together; a section too
long for one piece is cut at sentence (or line) boundaries, at word boundaries as a last resort,
with some overlap between its pieces so that no sentence loses its context at a cut. Every section
is tokenised once (in batches), and every piece is counted again at the end, so ``token_count`` is
exact, whatever the cuts did to words.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tokenizers import Encoding

from knowledge.extractors import Section
from knowledge.tokens import count_tokens_batch, encode_batch

DEFAULT_MAX_TOKENS = 200  # the embedder reads 256 tokens at most; room is left for special tokens
DEFAULT_OVERLAP_TOKENS = 40
SECTION_SEPARATOR = "\n\n"
# Sections per encode_batch call: big enough for the Rust side to parallelise, small enough that the
# offsets of a thousand-page document are never all held at once.
_ENCODE_BATCH_SIZE = 256
# Where a new sentence or line starts: after terminal punctuation (and closing quotes or brackets)
# followed by whitespace, after CJK full stops, and after every line break.
_SENTENCE_START = re.compile(r"[.!?\u2026][\"'\u201d\u2019)\]]*\s+|[\u3002\uff01\uff1f]\s*|\n\s*")
_CONTINUATION_PREFIX = "##"


@dataclass(frozen=True, slots=True)
class Piece:
    text: str
    position: int  # 0-based order within the document
    page: int | None  # page where the piece starts
    heading: str | None
    token_count: int  # real tokens, as knowledge.tokens.count_tokens counts them


@dataclass(frozen=True, slots=True)
class _Draft:
    text: str
    page: int | None
    heading: str | None


def chunk_sections(
    sections: Sequence[Section],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
) -> list[Piece]:
    """Pieces of at most ``max_tokens`` real tokens, in document order; deterministic and linear in the input.

    A piece never spans a heading change nor a page break, so a citation's page is exact. Long
    sections are split with ``overlap_tokens`` of overlap between their consecutive pieces; packed short
    sections do not overlap. Nothing is added to the text: the heading is metadata.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError("overlap_tokens must be at least 0 and less than max_tokens")
    drafts = list(_drafts(sections, max_tokens=max_tokens, overlap_tokens=overlap_tokens))
    pieces: list[Piece] = []
    for start in range(0, len(drafts), _ENCODE_BATCH_SIZE):
        batch = drafts[start : start + _ENCODE_BATCH_SIZE]
        for draft, token_count in zip(batch, count_tokens_batch([draft.text for draft in batch]), strict=True):
            for text, count in _fit(draft.text, token_count, max_tokens=max_tokens):
                pieces.append(
                    Piece(text=text, position=len(pieces), page=draft.page, heading=draft.heading, token_count=count)
                )
    return pieces


def _drafts(sections: Sequence[Section], *, max_tokens: int, overlap_tokens: int) -> Iterator[_Draft]:
    packed: list[str] = []
    packed_tokens = 0
    packed_page: int | None = None
    packed_heading: str | None = None

    def flush() -> Iterator[_Draft]:
        nonlocal packed_tokens
        if packed:
            yield _Draft(text=SECTION_SEPARATOR.join(packed), page=packed_page, heading=packed_heading)
            packed.clear()
            packed_tokens = 0

    for batch_start in range(0, len(sections), _ENCODE_BATCH_SIZE):
        batch = sections[batch_start : batch_start + _ENCODE_BATCH_SIZE]
        for section, encoding in zip(batch, encode_batch([section.text for section in batch]), strict=True):
            token_count = len(encoding.ids)
            if token_count == 0:
                continue  # nothing an embedder could see (whitespace, stray control characters)
            if packed and (
                section.heading != packed_heading
                or section.page != packed_page
                or packed_tokens + token_count > max_tokens
            ):
                yield from flush()
            if token_count > max_tokens:
                windows = _split_encoded(section.text, encoding, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
                yield from (_Draft(text=text, page=section.page, heading=section.heading) for text in windows)
                continue
            if not packed:
                packed_page, packed_heading = section.page, section.heading
            packed.append(section.text)
            packed_tokens += token_count
    yield from flush()


def _split_encoded(text: str, encoding: Encoding, *, max_tokens: int, overlap_tokens: int) -> list[str]:
    """Cut ``text`` (whose encoding is given) into windows of at most ``max_tokens`` of its tokens.

    A window ends at the last sentence or line start in the second half of its budget, else at the
    last word start, else (one word longer than the budget) anywhere. The next window starts up to
    ``overlap_tokens`` earlier, at a sentence start if one is in that range, else at a word start.
    """
    offsets = encoding.offsets
    token_count = len(offsets)
    if token_count <= max_tokens:
        return [text]
    is_word_start = [not token.startswith(_CONTINUATION_PREFIX) for token in encoding.tokens]
    sentence_starts = _sentence_start_tokens(text, offsets)
    windows = []
    start = 0
    while True:
        limit = start + max_tokens
        if limit >= token_count:
            end = token_count
        else:
            end = _first_found(
                _last_in(sentence_starts, low=start + max(1, max_tokens // 2), high=limit),
                _last_word_start(is_word_start, low=start + 1, high=limit),
                default=limit,
            )
        windows.append(text[offsets[start][0] : offsets[end - 1][1]])
        if end >= token_count:
            return windows
        if overlap_tokens == 0 or end - start <= overlap_tokens:
            start = end
            continue
        low = end - overlap_tokens
        start = _first_found(
            _first_in(sentence_starts, low=low, high=end - 1),
            _first_word_start(is_word_start, low=low, high=end - 1),
            default=end,
        )


def _first_found(*candidates: int | None, default: int) -> int:
    return next((candidate for candidate in candidates if candidate is not None), default)


def _sentence_start_tokens(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """Sorted indices of the tokens that begin a sentence or a line."""
    token_starts = [start for start, _ in offsets]
    indices: list[int] = []
    for match in _SENTENCE_START.finditer(text):
        index = bisect.bisect_left(token_starts, match.end())
        if 0 < index < len(token_starts) and (not indices or indices[-1] != index):
            indices.append(index)
    return indices


def _last_in(sorted_indices: list[int], *, low: int, high: int) -> int | None:
    position = bisect.bisect_right(sorted_indices, high) - 1
    return sorted_indices[position] if position >= 0 and sorted_indices[position] >= low else None


def _first_in(sorted_indices: list[int], *, low: int, high: int) -> int | None:
    position = bisect.bisect_left(sorted_indices, low)
    return sorted_indices[position] if position < len(sorted_indices) and sorted_indices[position] <= high else None


def _last_word_start(is_word_start: list[bool], *, low: int, high: int) -> int | None:
    for index in range(high, low - 1, -1):
        if is_word_start[index]:
            return index
    return None


def _first_word_start(is_word_start: list[bool], *, low: int, high: int) -> int | None:
    for index in range(low, high + 1):
        if is_word_start[index]:
            return index
    return None


def _fit(text: str, token_count: int, *, max_tokens: int) -> list[tuple[str, int]]:
    """``text`` as pieces of at most ``max_tokens``, each with its exact count.

    Counts are additive across whitespace, so drafts nearly always fit already; a cut inside a word
    can re-tokenise the word differently, and such a piece is cut again (always into shorter texts,
    so this ends).
    """
    if token_count <= max_tokens:
        return [(text, token_count)]
    fitted: list[tuple[str, int]] = []
    pending = [text]
    while pending:
        current = pending.pop()
        (encoding,) = encode_batch([current])
        if len(encoding.ids) <= max_tokens:
            fitted.append((current, len(encoding.ids)))
            continue
        parts = _split_encoded(current, encoding, max_tokens=max_tokens, overlap_tokens=0)
        pending.extend(reversed(parts))
    return fitted
