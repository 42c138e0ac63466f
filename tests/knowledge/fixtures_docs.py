"""Test documents built in memory: PDFs (fpdf2), Word files (python-docx), a zip bomb (hand-made ZIP)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import docx
import pypdf
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls
from fpdf import FPDF
from PIL import Image

DOCX_CONTENT_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@dataclass(frozen=True)
class PdfPage:
    heading: str | None  # written in bold and added to the outline (bookmarks)
    paragraphs: Sequence[str]
    subheading: str | None = None  # a level-2 outline entry before the last paragraph
    is_heading_printed: bool = True  # False: the heading is only a bookmark, not a line of text


def pdf_bytes(pages: Sequence[PdfPage], *, title: str | None = None) -> bytes:
    pdf = FPDF()
    if title:
        pdf.set_title(title)
    for page in pages:
        pdf.add_page()
        if page.heading:
            pdf.start_section(page.heading, level=0)
            if page.is_heading_printed:
                pdf.set_font("Helvetica", style="B", size=16)
                pdf.cell(0, 10, page.heading, new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", size=11)
        for index, paragraph in enumerate(page.paragraphs):
            if page.subheading and index == len(page.paragraphs) - 1:
                pdf.start_section(page.subheading, level=1)
                pdf.set_font("Helvetica", style="B", size=13)
                pdf.cell(0, 8, page.subheading, new_x="LMARGIN", new_y="NEXT")
                pdf.set_font("Helvetica", size=11)
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(4)
    return bytes(pdf.output())


def image_only_pdf_bytes(page_count: int = 2) -> bytes:
    """What a scanner produces: pages holding one picture each and no text."""
    pdf = FPDF()
    for _ in range(page_count):
        pdf.add_page()
        pdf.image(Image.new("RGB", (120, 160), color=(200, 200, 190)), x=10, y=10, w=120)
    return bytes(pdf.output())


def encrypted_pdf_bytes(source: bytes, *, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(source)))
    writer.encrypt(user_password=user_password, owner_password="owner-secret", algorithm="AES-256")
    output = io.BytesIO()
    writer.write(output)
    return output.getvalue()


@dataclass(frozen=True)
class DocxBlock:
    kind: str  # "heading", "paragraph", "table" or "title"
    text: str = ""
    level: int = 1
    rows: Sequence[Sequence[str]] = ()


def docx_bytes(blocks: Sequence[DocxBlock], *, title: str | None = None) -> bytes:
    document = docx.Document()
    if title:
        document.core_properties.title = title
    for block in blocks:
        if block.kind == "heading":
            document.add_heading(block.text, level=block.level)
        elif block.kind == "title":
            document.add_heading(block.text, level=0)
        elif block.kind == "paragraph":
            document.add_paragraph(block.text)
        elif block.kind == "table":
            table = document.add_table(rows=len(block.rows), cols=len(block.rows[0]))
            for row, values in zip(table.rows, block.rows, strict=True):
                for cell, value in zip(row.cells, values, strict=True):
                    cell.text = value
        else:
            raise ValueError(block.kind)
    output = io.BytesIO()
    document.save(output)
    return output.getvalue()


def docx_with_word_features_bytes() -> bytes:
    """Things Word writes that python-docx's simple API does not: a table of contents and a content
    control (both ``w:sdt``), a heading made by outline level rather than style, a merged cell."""
    document = docx.Document()
    body = document.element.body
    body.insert(
        0,
        parse_xml(
            f'<w:sdt {nsdecls("w")}><w:sdtPr><w:docPartObj><w:docPartGallery w:val="Table of Contents"/>'
            "</w:docPartObj></w:sdtPr><w:sdtContent><w:p><w:r><w:t>Top ........ 1</w:t></w:r></w:p>"
            "</w:sdtContent></w:sdt>"
        ),
    )
    document.add_heading("Top", level=1)
    document.add_paragraph("Before.")
    custom_heading = document.add_paragraph("Custom heading")
    custom_heading._p.get_or_add_pPr().append(parse_xml(f'<w:outlineLvl {nsdecls("w")} w:val="1"/>'))
    control = parse_xml(
        f"<w:sdt {nsdecls('w')}><w:sdtPr/><w:sdtContent><w:p><w:r><w:t>Inside a content control.</w:t></w:r>"
        "</w:p></w:sdtContent></w:sdt>"
    )
    body.insert(body.index(custom_heading._p) + 1, control)
    table = document.add_table(rows=2, cols=3)
    table.cell(0, 0).merge(table.cell(0, 1)).text = "Merged"
    table.cell(0, 2).text = "C"
    table.cell(1, 0).text = "x"
    table.cell(1, 2).text = "z"
    output = io.BytesIO()
    document.save(output)
    return output.getvalue()


# --- A zip bomb, made in milliseconds ------------------------------------------------------------
# Deflating 2 GiB of zeros takes seconds, so one MiB is deflated once, ending with a full flush (which
# resets the compressor's history), and that block is repeated: a valid deflate stream. The CRC of
# 2 GiB of zeros comes from the CRC of one MiB by composing its (affine, over GF(2)) update map.

_MEBIBYTE = 1024 * 1024


def zip_bomb_docx_bytes(*, uncompressed_bytes: int = 2 * 1024 * _MEBIBYTE) -> bytes:
    """A Word-looking package whose ``word/document.xml`` inflates to ``uncompressed_bytes`` of zeros."""
    if uncompressed_bytes % _MEBIBYTE or not 0 < uncompressed_bytes < 4 * 1024 * _MEBIBYTE:
        raise ValueError("a whole number of MiB below 4 GiB (no ZIP64 records here)")
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(bytes(_MEBIBYTE)) + compressor.flush(zlib.Z_FULL_FLUSH)
    blocks = uncompressed_bytes // _MEBIBYTE
    bomb = _RawEntry(
        name="word/document.xml",
        deflated=block * blocks + compressor.flush(zlib.Z_FINISH),
        crc=_crc32_of_zeros(blocks),
        size=uncompressed_bytes,
    )
    content_types = (
        b'<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
        b'content-types"><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-'
        b'officedocument.wordprocessingml.document.main+xml"/></Types>'
    )
    return _zip([_RawEntry.of("[Content_Types].xml", content_types), bomb])


@dataclass(frozen=True)
class _RawEntry:
    name: str
    deflated: bytes
    crc: int
    size: int

    @classmethod
    def of(cls, name: str, data: bytes) -> _RawEntry:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return cls(name, compressor.compress(data) + compressor.flush(), zlib.crc32(data), len(data))


def _zip(entries: Sequence[_RawEntry]) -> bytes:
    output = io.BytesIO()
    central = []
    for entry in entries:
        name = entry.name.encode()
        offset = output.tell()
        fields = (20, 0, 8, 0, 0, entry.crc, len(entry.deflated), entry.size, len(name))
        output.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", *fields, 0) + name + entry.deflated)
        central.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, *fields, 0, 0, 0, 0, 0, offset) + name)
    directory_offset = output.tell()
    directory = b"".join(central)
    output.write(directory)
    output.write(
        struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(directory), directory_offset, 0)
    )
    return output.getvalue()


def _crc32_of_zeros(mebibytes: int) -> int:
    def apply(columns: list[int], vector: int) -> int:
        result, bit = 0, 0
        while vector:
            if vector & 1:
                result ^= columns[bit]
            vector >>= 1
            bit += 1
        return result

    zeros = bytes(_MEBIBYTE)
    constant = zlib.crc32(zeros, 0)
    step = ([zlib.crc32(zeros, 1 << bit) ^ constant for bit in range(32)], constant)

    def compose(outer: tuple[list[int], int], inner: tuple[list[int], int]) -> tuple[list[int], int]:
        return [apply(outer[0], column) for column in inner[0]], apply(outer[0], inner[1]) ^ outer[1]

    total: tuple[list[int], int] = ([1 << bit for bit in range(32)], 0)  # identity
    while mebibytes:
        if mebibytes & 1:
            total = compose(step, total)
        step = compose(step, step)
        mebibytes >>= 1
    return total[1]
