"""Zip bomb guard for ZIP-based formats: judge an archive by its central directory before unpacking a byte."""

from __future__ import annotations

import io
import zipfile

from knowledge.extractors.errors import ExtractionError

_MEBIBYTE = 1024 * 1024
_MAX_ENTRIES = 10_000
# Word XML compresses about 5-20:1; only deliberately crafted data compresses past 100:1 (deflate
# tops out near 1030:1). Small entries are exempt: their ratio can be anything and they cost nothing.
_MAX_COMPRESSION_RATIO = 100
_RATIO_EXEMPT_BYTES = _MEBIBYTE


def check_archive(data: bytes, *, what: str, max_uncompressed_bytes: int) -> None:
    """Raise ``archive_too_large`` for an archive that would unpack too far, ``corrupt_file`` for a broken one.

    Only the central directory is read. Declared sizes are binding: ``zipfile`` never returns more than
    an entry's declared ``file_size`` (and fails its CRC check when the data would go on).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ExtractionError(f"The {what} file is damaged and could not be read.", code="corrupt_file") from exc
    if len(entries) > _MAX_ENTRIES:
        raise ExtractionError(
            f"The {what} file holds {len(entries)} internal parts, more than the {_MAX_ENTRIES} allowed.",
            code="archive_too_large",
        )
    total = sum(entry.file_size for entry in entries)
    if total > max_uncompressed_bytes:
        raise ExtractionError(
            f"The {what} file unpacks to {total / _MEBIBYTE:.0f} MB, more than the"
            f" {max_uncompressed_bytes / _MEBIBYTE:.0f} MB limit.",
            code="archive_too_large",
        )
    for entry in entries:
        ratio = entry.file_size // max(entry.compress_size, 1)
        if entry.file_size > _RATIO_EXEMPT_BYTES and ratio > _MAX_COMPRESSION_RATIO:
            raise ExtractionError(
                f"The {what} file is compressed implausibly well ({ratio}:1), which is how zip bombs look;"
                " it was not unpacked.",
                code="archive_too_large",
            )
