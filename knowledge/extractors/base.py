"""What every extractor returns, and the text cleaning they share."""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

HEADING_SEPARATOR = " \u203a "  # single right-pointing angle quotation mark
WORDS_PER_ESTIMATED_PAGE = 500

SUPPORTED_KINDS = ("pdf", "docx", "html", "markdown", "text", "csv")


@dataclass(frozen=True, slots=True)
class Section:
    """One structural block of a document: a paragraph, a list item, a table, a code block."""

    text: str
    page: int | None
    heading: str | None


@dataclass(frozen=True, slots=True)
class Extracted:
    kind: str
    title: str | None
    sections: list[Section]
    page_count: int


# C0 and C1 control characters except tab and newline, plus characters that only steer layout or
# rendering (BOM/zero-width no-break space, soft hyphen): they carry no text and confuse tokenisers.
_DELETED_CHARACTERS = {
    **{code: None for code in range(0x20) if code not in (0x09, 0x0A)},
    **dict.fromkeys(range(0x7F, 0xA0)),
    0xFEFF: None,
    0x00AD: None,
}
_LINE_BREAKS = re.compile(r"\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_INLINE_SPACE = re.compile(r"[^\S\n]+")
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str, *, keep_layout: bool = False) -> str:
    """NFC-normalise, drop control characters (keeping newlines and tabs) and normalise whitespace.

    Without ``keep_layout`` runs of spaces and tabs become one space and lines are stripped; with it
    (code blocks) indentation and tabs survive and only trailing spaces go. Either way at most one
    blank line remains between lines, and the result is stripped.
    """
    text = _LINE_BREAKS.sub("\n", text)
    text = unicodedata.normalize("NFC", text).translate(_DELETED_CHARACTERS)
    if keep_layout:
        text = _TRAILING_SPACE.sub("", text)
        # Strip blank lines around the block, never the indentation of its first line.
        text = text.strip("\n")
        return _BLANK_LINES.sub("\n\n", text) if text.strip() else ""
    text = _INLINE_SPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def heading_path(headings: Iterable[str]) -> str | None:
    """``["Billing", "Refunds"]`` → ``"Billing \u203a Refunds"``; ``None`` when there is no heading."""
    parts = [heading for heading in headings if heading]
    return HEADING_SEPARATOR.join(parts) if parts else None


class HeadingStack:
    """The enclosing headings at the current point of a document, by level (1 outermost)."""

    def __init__(self) -> None:
        self._levels: list[tuple[int, str]] = []

    def enter(self, level: int, title: str) -> None:
        title = clean_text(title).replace("\n", " ")
        while self._levels and self._levels[-1][0] >= level:
            self._levels.pop()
        if title:
            self._levels.append((level, title))

    @property
    def path(self) -> str | None:
        return heading_path(title for _, title in self._levels)


def estimate_page_count(sections: Iterable[Section]) -> int:
    words = sum(len(section.text.split()) for section in sections)
    return max(1, math.ceil(words / WORDS_PER_ESTIMATED_PAGE))


def clean_title(title: object) -> str | None:
    if not isinstance(title, str):
        return None
    cleaned = clean_text(title).replace("\n", " ")
    return cleaned or None
