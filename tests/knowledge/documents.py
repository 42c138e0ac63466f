"""Small real documents built in memory for ingestion tests (fpdf2, pypdf, python-docx)."""

from __future__ import annotations

import io

import docx
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter


def pdf_bytes(pages: list[str], *, title: str = "") -> bytes:
    """A PDF with one page per string (real text objects, extractable)."""
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    pdf.set_font("Helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    return bytes(pdf.output())


def encrypted_pdf_bytes(text: str, *, password: str = "s3cret") -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes([text]))))
    writer.encrypt(user_password=password, owner_password=password)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def docx_bytes(paragraphs: list[tuple[str, str]]) -> bytes:
    """A DOCX of (style, text) paragraphs, e.g. ("Heading 1", "Security"), ("Normal", "…")."""
    document = docx.Document()
    for style, text in paragraphs:
        document.add_paragraph(text, style=style)
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()
