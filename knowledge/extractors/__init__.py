"""Document extraction: what a file really is (``detect_kind``) and its text as structured sections (``extract``).

Pure functions over bytes: no models, no database, no network. Every failure is an ``ExtractionError``
whose message can be shown to the tenant as the document's error.
"""

from __future__ import annotations

from knowledge.extractors.base import SUPPORTED_KINDS, Extracted, Section
from knowledge.extractors.csv import extract_csv
from knowledge.extractors.detection import detect_kind
from knowledge.extractors.docx import extract_docx
from knowledge.extractors.errors import ExtractionError
from knowledge.extractors.html import extract_html
from knowledge.extractors.markdown import extract_markdown
from knowledge.extractors.pdf import extract_pdf
from knowledge.extractors.text import extract_text

__all__ = ["SUPPORTED_KINDS", "Extracted", "ExtractionError", "Section", "detect_kind", "extract"]

DEFAULT_MAX_PAGES = 5000
DEFAULT_MAX_UNCOMPRESSED_BYTES = 200 * 1024 * 1024


def extract(
    data: bytes,
    *,
    kind: str,
    max_pages: int = DEFAULT_MAX_PAGES,
    max_uncompressed_bytes: int = DEFAULT_MAX_UNCOMPRESSED_BYTES,
) -> Extracted:
    """Extract structured text from a document of a known ``kind`` (see ``detect_kind``).

    Raises ``ExtractionError`` and nothing else for bad input: ``encrypted_pdf`` (a PDF that does not open
    with an empty password), ``corrupt_file`` (damaged PDF, DOCX or CSV), ``archive_too_large`` (a DOCX,
    or a PDF stream, that would unpack past ``max_uncompressed_bytes`` or is compressed implausibly well;
    judged before anything is unpacked), ``too_many_pages`` (more than ``max_pages`` PDF pages),
    ``invalid_text`` (a text kind that is not valid UTF-8 or holds NUL bytes), ``empty_document`` (no
    extractable text, e.g. a scanned PDF) and ``unsupported_type`` (an unknown ``kind``).
    """
    if kind == "pdf":
        return extract_pdf(data, max_pages=max_pages)
    if kind == "docx":
        return extract_docx(data, max_uncompressed_bytes=max_uncompressed_bytes)
    if kind == "html":
        return extract_html(data)
    if kind == "markdown":
        return extract_markdown(data)
    if kind == "text":
        return extract_text(data)
    if kind == "csv":
        return extract_csv(data)
    raise ExtractionError(f"Documents of kind {kind!r} are not supported.", code="unsupported_type")
