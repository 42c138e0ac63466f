"""Markdown by its block structure: ATX and setext headings build the heading path, fenced code stays whole.

Inline markup (emphasis, links) is kept as written: it reads fine to an embedder and to a person.
"""

from __future__ import annotations

import re

from knowledge.extractors.base import Extracted, HeadingStack, Section, clean_text, estimate_page_count
from knowledge.extractors.encoding import decode_text
from knowledge.extractors.errors import ExtractionError

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+|$)")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_THEMATIC_BREAK = re.compile(r"^ {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$")
_LIST_ITEM = re.compile(r"^ {0,3}(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)")
_FRONT_MATTER_END = re.compile(r"^(?:---|\.\.\.)[ \t]*$")
_MAX_FRONT_MATTER_LINES = 200


def extract_markdown(data: bytes) -> Extracted:
    lines = decode_text(data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    parser = _Parser()
    start = _front_matter_end(lines)
    if start:
        parser.emit(lines[:start], keep_layout=True)
    parser.feed(lines[start:])
    if not parser.sections:
        raise ExtractionError("The Markdown document contains no text.", code="empty_document")
    return Extracted(
        kind="markdown",
        title=parser.title,
        sections=parser.sections,
        page_count=estimate_page_count(parser.sections),
    )


def _atx_heading_text(rest: str) -> str:
    """The heading text without an optional closing sequence of ``#`` (``## Title ##``)."""
    text = rest.strip()
    without_closing = text.rstrip("#")
    if without_closing != text and (not without_closing or without_closing[-1] in " \t"):
        return without_closing.strip()
    return text


def _front_matter_end(lines: list[str]) -> int:
    """Number of lines of a YAML front matter block at the top (0 when there is none)."""
    if not lines or lines[0].strip() != "---":
        return 0
    for index in range(1, min(len(lines), _MAX_FRONT_MATTER_LINES)):
        if _FRONT_MATTER_END.match(lines[index]):
            return index + 1
    return 0


class _Parser:
    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.title: str | None = None
        self._headings = HeadingStack()
        self._paragraph: list[str] = []

    def feed(self, lines: list[str]) -> None:
        fence: str | None = None
        code: list[str] = []
        for line in lines:
            if fence is not None:
                code.append(line)
                stripped = line.strip()
                if stripped.startswith(fence) and not stripped.strip(fence[0]):
                    self.emit(code, keep_layout=True)
                    code, fence = [], None
                continue
            opening = _FENCE_OPEN.match(line)
            if opening:
                self._flush_paragraph()
                fence, code = opening.group(1), [line]
                continue
            if self._paragraph and _SETEXT_UNDERLINE.match(line) and not _LIST_ITEM.match(self._paragraph[0]):
                level = 1 if line.strip().startswith("=") else 2
                self._enter_heading(level, " ".join(self._paragraph))
                self._paragraph.clear()
                continue
            heading = _ATX_HEADING.match(line)
            if heading:
                self._flush_paragraph()
                self._enter_heading(len(heading.group(1)), _atx_heading_text(line[heading.end() :]))
                continue
            if not line.strip() or _THEMATIC_BREAK.match(line):
                self._flush_paragraph()
                continue
            self._paragraph.append(line)
        self._flush_paragraph()
        if code:  # an unclosed fence runs to the end of the document
            self.emit(code, keep_layout=True)

    def emit(self, lines: list[str], *, keep_layout: bool = False) -> None:
        text = clean_text("\n".join(lines), keep_layout=keep_layout)
        if text:
            self.sections.append(Section(text=text, page=None, heading=self._headings.path))

    def _flush_paragraph(self) -> None:
        self.emit(self._paragraph)
        self._paragraph.clear()

    def _enter_heading(self, level: int, text: str) -> None:
        self._headings.enter(level, text)
        if level == 1 and self.title is None:
            self.title = clean_text(text).replace("\n", " ") or None
