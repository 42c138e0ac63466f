"""Plain text: paragraphs are separated by blank lines."""

from __future__ import annotations

import re

from knowledge.extractors.base import Extracted, Section, clean_text, estimate_page_count
from knowledge.extractors.encoding import decode_text
from knowledge.extractors.errors import ExtractionError

_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n")


def extract_text(data: bytes) -> Extracted:
    text = decode_text(data).replace("\r\n", "\n").replace("\r", "\n")
    sections = [
        Section(text=cleaned, page=None, heading=None)
        for cleaned in (clean_text(paragraph) for paragraph in _PARAGRAPH_BREAK.split(text))
        if cleaned
    ]
    if not sections:
        raise ExtractionError("The text file contains no text.", code="empty_document")
    return Extracted(kind="text", title=None, sections=sections, page_count=estimate_page_count(sections))
