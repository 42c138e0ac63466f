"""Bytes to text for the text kinds: UTF-8 (with or without BOM), UTF-16/32 with a BOM, nothing else.

Guessing legacy encodings silently corrupts text, so anything else is refused with the offset of the
first bad byte — except HTML that declares its charset in a ``<meta>`` tag, which browsers honour too.
"""

from __future__ import annotations

import codecs
import re

from knowledge.extractors.errors import ExtractionError

_BOMS = (
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)
_META_CHARSET_WINDOW = 4096
# As in the WHATWG encoding standard: pages labelled Latin-1 or ASCII are really Windows-1252.
_WHATWG_SUBSTITUTES = {"iso8859-1": "cp1252", "ascii": "cp1252"}
# A meta tag cannot sensibly declare these: the tag itself would not be readable in them.
_REFUSED_META_CHARSETS = {"utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-7"}


def split_bom(data: bytes) -> tuple[bytes, str | None, str]:
    """The data without its byte order mark, the codec the mark names (None without one) and its label."""
    for bom, codec, label in _BOMS:
        if data.startswith(bom):
            return data[len(bom) :], codec, label
    return data, None, "UTF-8"


def decode_text(data: bytes, *, is_html: bool = False) -> str:
    """Decode a text document, raising ``ExtractionError(code="invalid_text")`` when it is not clean text."""
    body, codec, label = split_bom(data)
    if codec is None and b"\x00" in body:
        offset = body.index(b"\x00")
        raise ExtractionError(
            f"The file contains a NUL byte at offset {offset}; it looks like binary data, not text.",
            code="invalid_text",
        )
    try:
        text = body.decode(codec or "utf-8")
    except UnicodeDecodeError as exc:
        declared = declared_html_codec(body) if is_html and codec is None else None
        if declared is None:
            raise invalid_text_error(offset=exc.start + len(data) - len(body), encoding=label) from exc
        text = body.decode(declared, errors="replace")
    if "\x00" in text:
        raise ExtractionError(
            f"The file contains a NUL character at position {text.index(chr(0))}; it is not plain text.",
            code="invalid_text",
        )
    return text


def invalid_text_error(*, offset: int, encoding: str = "UTF-8") -> ExtractionError:
    return ExtractionError(
        f"The file is not valid {encoding} text (invalid byte at offset {offset}). "
        "Save it as UTF-8 and upload it again.",
        code="invalid_text",
    )


def declared_html_codec(data: bytes) -> str | None:
    """The codec a ``<meta charset>`` near the start names, if it is one a browser would honour there."""
    match = _META_CHARSET.search(data[:_META_CHARSET_WINDOW])
    if match is None:
        return None
    label = match.group(1).decode("ascii").lower()
    try:
        name = codecs.lookup(label).name
    except LookupError:
        return None
    name = _WHATWG_SUBSTITUTES.get(name, name)
    if name in _REFUSED_META_CHARSETS or name == "utf-8":
        return None
    return name
