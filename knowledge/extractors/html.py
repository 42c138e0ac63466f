"""HTML text with BeautifulSoup and lxml: page chrome dropped, h1-h6 building the heading path."""

from __future__ import annotations

import re

from bs4 import BeautifulSoup, Comment, Declaration, Doctype, NavigableString, ProcessingInstruction, Tag

from knowledge.extractors.base import Extracted, HeadingStack, Section, clean_text, clean_title, estimate_page_count
from knowledge.extractors.encoding import decode_text
from knowledge.extractors.errors import ExtractionError

# Navigation, page chrome and non-text content: not part of what the page says.
_DROPPED_TAGS = (
    "script",
    "style",
    "nav",
    "footer",
    "header",
    "aside",
    "noscript",
    "svg",
    "form",
    "template",
    "iframe",
    "object",
    "canvas",
    "button",
    "select",
)
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "blockquote",
        "body",
        "caption",
        "dd",
        "details",
        "dialog",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "hr",
        "li",
        "main",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "td",
        "th",
        "tr",
        "ul",
        "html",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
    }
)
_LAYOUT_CONTENT = ["p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "table", "pre", "blockquote", "section"]
_HEADING_TAG = re.compile(r"^h([1-6])$")
_SKIPPED_STRINGS = (Comment, Declaration, Doctype, ProcessingInstruction)
_CELL_SEPARATOR = " | "
# <br> marks a line break that survives whitespace collapsing (source newlines do not).
_LINE_BREAK = "\u2028"


def extract_html(data: bytes) -> Extracted:
    text = decode_text(data, is_html=True)
    soup = BeautifulSoup(text, "lxml")
    title_tag = soup.find("title")
    title = clean_title(title_tag.get_text(" ", strip=True)) if title_tag is not None else None
    for tag in soup.find_all([*_DROPPED_TAGS, "head"]):
        tag.decompose()
    for tag in soup.find_all(hidden=True):
        tag.decompose()
    _render_tables(soup)
    sections = _sections(soup)
    if not sections:
        raise ExtractionError("The web page contains no text.", code="empty_document")
    return Extracted(kind="html", title=title, sections=sections, page_count=estimate_page_count(sections))


def _render_tables(soup: BeautifulSoup) -> None:
    """Replace each data table by a ``<pre>`` of its rows ("cell | cell"), one row per line.

    Innermost tables first. A table holding paragraphs, headings, lists or other tables lays out a page
    rather than holding data: it is left alone, and its cells are walked like any other block.
    """
    for table in reversed(soup.find_all("table")):
        if table.find(_LAYOUT_CONTENT) is not None:
            continue
        lines = []
        for row in table.find_all("tr"):
            cells = [
                clean_text(cell.get_text(" ", strip=True)).replace("\n", " ")
                for cell in row.find_all(["td", "th"], recursive=False)
            ]
            cells = [cell for cell in cells if cell]
            if cells:
                lines.append(_CELL_SEPARATOR.join(cells))
        replacement = soup.new_tag("pre")
        replacement.string = "\n".join(lines)
        table.replace_with(replacement)


def _sections(soup: BeautifulSoup) -> list[Section]:
    """Walk the text in document order; text belongs to its nearest block ancestor, and each block is a section.

    Iterative (``descendants``), so deeply nested markup cannot exhaust the stack.
    """
    sections: list[Section] = []
    headings = HeadingStack()
    block_cache: dict[int, Tag | None] = {}
    current_block: Tag | None = None
    parts: list[str] = []

    def flush() -> None:
        raw = "".join(parts)
        parts.clear()
        name = current_block.name if current_block is not None else ""
        heading = _HEADING_TAG.match(name)
        if heading:
            headings.enter(int(heading.group(1)), _inline(raw))
            return
        text = clean_text(raw, keep_layout=True) if name == "pre" else _inline(raw)
        if text:
            sections.append(Section(text=text, page=None, heading=headings.path))

    for node in soup.descendants:
        if isinstance(node, Tag):
            if node.name == "br":
                parts.append(_LINE_BREAK)
            continue
        assert isinstance(node, NavigableString)  # a document's nodes are tags and strings
        if isinstance(node, _SKIPPED_STRINGS):
            continue
        block = _nearest_block(node, block_cache)
        if block is not current_block:
            flush()
            current_block = block
        parts.append(str(node))
    flush()
    return sections


def _nearest_block(node: NavigableString, cache: dict[int, Tag | None]) -> Tag | None:
    """The closest block-level ancestor; inline ancestors remember theirs, keeping the walk linear."""
    inline_chain: list[Tag] = []
    ancestor = node.parent
    while ancestor is not None and ancestor.name not in _BLOCK_TAGS:
        if id(ancestor) in cache:
            block = cache[id(ancestor)]
            break
        inline_chain.append(ancestor)
        ancestor = ancestor.parent
    else:
        block = ancestor
    for tag in inline_chain:
        cache[id(tag)] = block
    return block


def _inline(raw: str) -> str:
    """Source whitespace is insignificant in HTML; only ``<br>`` breaks a line."""
    return clean_text("\n".join(" ".join(line.split()) for line in raw.split(_LINE_BREAK)))
