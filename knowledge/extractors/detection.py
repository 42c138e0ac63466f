"""What a document really is, judged from its bytes; the name and declared type only break ties between text kinds."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from pathlib import PurePosixPath

from knowledge.extractors.encoding import declared_html_codec, decode_text, invalid_text_error, split_bom
from knowledge.extractors.errors import ExtractionError

# Acrobat accepts a PDF header anywhere in the first kilobyte, after junk some generators emit.
_PDF_HEADER_WINDOW = 1024
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"RIFF", "a RIFF media file (WebP, WAV or AVI)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "an executable program"),
    (b"MZ", "an executable program"),
    (b"\xcf\xfa\xed\xfe", "an executable program"),
    (b"\xca\xfe\xba\xbe", "an executable program"),
    (b"\x00asm", "a WebAssembly module"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office file (.doc, .xls, .ppt); save it as DOCX or PDF"),
    (b"{\\rtf", "an RTF document; save it as DOCX or PDF"),
    (b"%!PS", "a PostScript file; convert it to PDF"),
    (b"OggS", "an audio file"),
    (b"ID3", "an audio file"),
    (b"fLaC", "an audio file"),
)
# Some signatures are short enough to begin ordinary text ("MZ", "BZh", "ID3"); those count only
# when the data is not clean text anyway.
_WEAK_SIGNATURES = frozenset({b"MZ", b"BZh", b"ID3", b"RIFF", b"OggS", b"fLaC"})
_BINARY_SAMPLE = 8192
# Share of control bytes above which undecodable data is binary rather than mis-encoded text.
_BINARY_CONTROL_SHARE = 0.02
_TEXT_CONTROL_BYTES = frozenset(b"\t\n\r\f\v\x1b")

_EXTENSION_KINDS = {
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".md": "markdown",
    ".markdown": "markdown",
    ".mdown": "markdown",
    ".mkd": "markdown",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
    ".tsv": "csv",
}
_MEDIA_TYPE_KINDS = {
    "text/html": "html",
    "application/xhtml+xml": "html",
    "text/markdown": "markdown",
    "text/x-markdown": "markdown",
    "text/plain": "text",
    "text/csv": "csv",
    "application/csv": "csv",
    "text/tab-separated-values": "csv",
}

_LEADING_MARKUP_NOISE = re.compile(r"^(?:\s+|<\?xml[^>]*>|<!--.*?-->)+", re.DOTALL)
_STRONG_HTML = re.compile(r"<!doctype\s+html|<html[\s>]", re.IGNORECASE)
_SVG = re.compile(r"<svg[\s>]|<!doctype\s+svg", re.IGNORECASE)
_HTML_TAG = re.compile(
    r"<(?:head|body|div|p|h[1-6]|table|ul|ol|section|article|main|meta|title|link|span|a|img|br|header|nav)[\s>/]",
    re.IGNORECASE,
)
_MARKDOWN_BLOCK = re.compile(r"^ {0,3}(?:#{1,6}[ \t]+\S|```|~~~)")  # ATX heading or code fence
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(?:={3,}|-{3,})[ \t]*$")
# Bounded repetitions: no quadratic backtracking on a line of "[" characters.
_MARKDOWN_LINK = re.compile(r"\[[^\]\n]{1,200}\]\([^)\s]{1,500}\)")
_TEXT_SAMPLE = 65536
_CSV_SAMPLE = 4096  # a few dozen lines; csv.Sniffer is slow on big samples
_CSV_MIN_ROWS = 3


def detect_kind(data: bytes, *, filename: str = "", declared_type: str = "") -> str:
    """The document's kind (one of ``SUPPORTED_KINDS``) from its content.

    Raises ``ExtractionError``: ``empty_document`` for no content, ``unsupported_type`` for images,
    archives, executables and any other binary data (NUL bytes count as binary here; ``extract`` on a
    text kind reports them as ``invalid_text``), ``invalid_text`` for text that is not valid UTF-8 (with
    the offset of the first bad byte). ``filename`` and ``declared_type`` only choose between text kinds.
    """
    if not data.strip():
        raise ExtractionError("The file is empty.", code="empty_document")
    if b"%PDF-" in data[:_PDF_HEADER_WINDOW]:
        return "pdf"
    if data.startswith(_ZIP_SIGNATURES):
        return _detect_zip_kind(data)
    if split_bom(data)[1] is None:
        _reject_binary(data)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if _looks_binary(data):
                raise ExtractionError(
                    "The file is binary data, not a supported document.", code="unsupported_type"
                ) from None
            # Legacy HTML may declare its encoding; extraction decodes it the way a browser would.
            if declared_html_codec(data) is not None and _looks_like_html(data[:_TEXT_SAMPLE].decode("latin-1")):
                return "html"
            raise invalid_text_error(offset=exc.start) from exc
    text = decode_text(data)
    if not text.strip():
        raise ExtractionError("The file is empty.", code="empty_document")
    return _text_kind(text, hint=_hinted_kind(filename, declared_type))


def _detect_zip_kind(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        # Damaged archive: the local headers still name their entries in clear text, so a broken Word
        # file is still recognisable (and extraction then reports it as corrupt).
        if b"word/document.xml" in data:
            return "docx"
        raise ExtractionError("The file is a damaged or unsupported ZIP archive.", code="unsupported_type") from None
    if "word/document.xml" in names:
        return "docx"
    if "xl/workbook.xml" in names:
        what = "an Excel workbook; export the sheet as CSV"
    elif "ppt/presentation.xml" in names:
        what = "a PowerPoint presentation; export it as PDF"
    elif "mimetype" in names:
        what = "an OpenDocument or EPUB file; save it as DOCX or PDF"
    else:
        what = "a ZIP archive; upload the documents inside it one by one"
    raise ExtractionError(f"The file is {what}.", code="unsupported_type")


def _reject_binary(data: bytes) -> None:
    is_clean_text = b"\x00" not in data[:_BINARY_SAMPLE] and not _looks_binary(data)
    for signature, what in _BINARY_SIGNATURES:
        if data.startswith(signature) and not (signature in _WEAK_SIGNATURES and is_clean_text):
            raise ExtractionError(
                f"The file is {what}, which is not a supported document type.", code="unsupported_type"
            )
    if b"\x00" in data:
        raise ExtractionError(
            "The file contains NUL bytes: it is binary data, not a supported document.", code="unsupported_type"
        )


def _looks_binary(data: bytes) -> bool:
    sample = data[:_BINARY_SAMPLE]
    controls = sum(1 for byte in sample if (byte < 0x20 or byte == 0x7F) and byte not in _TEXT_CONTROL_BYTES)
    return controls > len(sample) * _BINARY_CONTROL_SHARE


def _hinted_kind(filename: str, declared_type: str) -> str | None:
    suffix = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if suffix in _EXTENSION_KINDS:
        return _EXTENSION_KINDS[suffix]
    media_type = declared_type.split(";", 1)[0].strip().lower()
    return _MEDIA_TYPE_KINDS.get(media_type)


def _looks_like_html(text: str) -> bool:
    head = _LEADING_MARKUP_NOISE.sub("", text[:_TEXT_SAMPLE], count=1)
    return _STRONG_HTML.match(head) is not None or _HTML_TAG.match(head) is not None


def _text_kind(text: str, *, hint: str | None) -> str:
    head = _LEADING_MARKUP_NOISE.sub("", text[:_TEXT_SAMPLE], count=1)
    if _STRONG_HTML.match(head):
        return "html"
    if _SVG.match(head):
        raise ExtractionError(
            "The file is an SVG image, which is not a supported document type.", code="unsupported_type"
        )
    if _HTML_TAG.match(head) and hint in (None, "html"):
        return "html"
    if hint in ("markdown", "text", "csv"):
        return hint
    sample = text[:_TEXT_SAMPLE]
    if _has_markdown_structure(sample) or len(_MARKDOWN_LINK.findall(sample)) >= 2:
        return "markdown"
    if _looks_like_csv(text[:_CSV_SAMPLE]):
        return "csv"
    return "text"


def _has_markdown_structure(sample: str) -> bool:
    previous = ""
    for line in sample.splitlines():
        if _MARKDOWN_BLOCK.match(line) or (previous.strip() and _SETEXT_UNDERLINE.match(line)):
            return True
        previous = line
    return False


def _looks_like_csv(sample: str) -> bool:
    lines = sample.splitlines()
    if len(sample) == _CSV_SAMPLE and len(lines) > 1:
        lines = lines[:-1]  # the sample cut the last line short
    lines = [line for line in lines if line.strip()]
    if len(lines) < _CSV_MIN_ROWS:
        return False
    joined = "\n".join(lines)
    try:
        dialect = csv.Sniffer().sniff(joined, delimiters=",;\t|")
        widths = {len(row) for row in csv.reader(io.StringIO(joined), dialect)}
    except csv.Error:
        return False
    return len(widths) == 1 and widths.pop() >= 2
