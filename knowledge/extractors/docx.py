"""DOCX text with python-docx: body paragraphs and tables in order, heading styles building the heading path."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import docx
from docx.document import Document
from docx.oxml.ns import qn
from docx.table import Table
from docx.text.paragraph import Paragraph
from lxml import etree

from knowledge.extractors.archive import check_archive
from knowledge.extractors.base import Extracted, HeadingStack, Section, clean_text, clean_title, estimate_page_count
from knowledge.extractors.errors import ExtractionError

_HEADING_STYLE = re.compile(r"^heading ([1-9])$", re.IGNORECASE)
_TOC_STYLE = re.compile(r"^toc( heading| \d)", re.IGNORECASE)
_TITLE_STYLE = "title"
_BODY_TEXT_OUTLINE_LEVEL = 9
_MAX_STYLE_DEPTH = 10
_CELL_SEPARATOR = " | "
# Compiled with their namespaces: they run on python-docx's element classes and on plain lxml elements
# (content controls have no python-docx class) alike.
_NAMESPACES = {"w": "http://schemas.openxmlformats.org/wordprocessingml/2006/main"}
_OUTLINE_LEVEL = etree.XPath("./w:pPr/w:outlineLvl/@w:val", namespaces=_NAMESPACES)
_DOC_PART_GALLERY = etree.XPath("./w:sdtPr/w:docPartObj/w:docPartGallery/@w:val", namespaces=_NAMESPACES)


def extract_docx(data: bytes, *, max_uncompressed_bytes: int) -> Extracted:
    check_archive(data, what="Word", max_uncompressed_bytes=max_uncompressed_bytes)
    # python-docx surfaces malformed packages as KeyError, ValueError, lxml syntax errors and more;
    # to the uploader they all mean the same, so they are caught broadly and wrapped.
    try:
        document = docx.Document(io.BytesIO(data))
    except ValueError as exc:
        if "content type" in str(exc):
            raise ExtractionError(
                "The file is not a Word document (macro-enabled documents and templates are not supported).",
                code="unsupported_type",
            ) from exc
        raise _corrupt() from exc
    except Exception as exc:
        raise _corrupt() from exc
    try:
        title = clean_title(document.core_properties.title)
        sections: list[Section] = []
        headings = HeadingStack()
        for block in _blocks(document):
            if isinstance(block, Table):
                text = _table_text(block)
                if text:
                    sections.append(Section(text=text, page=None, heading=headings.path))
                continue
            style_name = _style_name(block)
            if _TOC_STYLE.match(style_name):
                continue
            if style_name.lower() == _TITLE_STYLE:
                title = title or clean_title(block.text)
                continue
            level = _heading_level(block)
            if level is not None:
                headings.enter(level, block.text)
                continue
            text = clean_text(block.text)
            if text:
                sections.append(Section(text=text, page=None, heading=headings.path))
    except ExtractionError:
        raise
    except Exception as exc:
        raise _corrupt() from exc
    if not sections:
        raise ExtractionError("The Word document contains no text.", code="empty_document")
    return Extracted(kind="docx", title=title, sections=sections, page_count=estimate_page_count(sections))


def _corrupt() -> ExtractionError:
    return ExtractionError("The Word document is damaged and could not be read.", code="corrupt_file")


def _blocks(document: Document) -> Iterator[Paragraph | Table]:
    """Body paragraphs and tables in order, including those inside content controls, except a table of contents."""
    pending = list(document.element.body.iterchildren())
    pending.reverse()
    while pending:
        element = pending.pop()
        if element.tag == qn("w:p"):
            yield Paragraph(element, document)
        elif element.tag == qn("w:tbl"):
            yield Table(element, document)
        elif element.tag == qn("w:sdt") and not _is_table_of_contents(element):
            for content in element.iterchildren(qn("w:sdtContent")):
                pending.extend(reversed(list(content.iterchildren())))


def _is_table_of_contents(sdt: etree._Element) -> bool:
    gallery = _DOC_PART_GALLERY(sdt)
    return bool(gallery) and str(gallery[0]).lower().startswith("table of contents")


def _style_name(paragraph: Paragraph) -> str:
    style = paragraph.style
    return (style.name or "") if style is not None else ""


def _heading_level(paragraph: Paragraph) -> int | None:
    """1-9 for a heading: a "Heading N" style, or an outline level on the paragraph or its style chain."""
    match = _HEADING_STYLE.match(_style_name(paragraph))
    if match:
        return int(match.group(1))
    levels = _OUTLINE_LEVEL(paragraph._p)
    style = paragraph.style
    depth = 0
    while not levels and style is not None and depth < _MAX_STYLE_DEPTH:
        levels = _OUTLINE_LEVEL(style.element)
        style = style.base_style
        depth += 1
    if not levels or not str(levels[0]).isdigit():
        return None
    level = int(levels[0])
    return level + 1 if level < _BODY_TEXT_OUTLINE_LEVEL else None


def _table_text(table: Table) -> str:
    """One line per row, cells joined by " | "; a merged cell is written once per row."""
    lines = []
    for row in table.rows:
        cells = []
        previous = None
        for cell in row.cells:
            if previous is not None and cell._tc is previous:
                continue
            previous = cell._tc
            text = clean_text(cell.text).replace("\n", " ")
            if text:
                cells.append(text)
        if cells:
            lines.append(_CELL_SEPARATOR.join(cells))
    return "\n".join(lines)
