"""CSV: the first row names the columns; every other row becomes "Column: value; Column: value"."""

from __future__ import annotations

import csv
import io

from knowledge.extractors.base import Extracted, Section, clean_text, estimate_page_count
from knowledge.extractors.encoding import decode_text
from knowledge.extractors.errors import ExtractionError

_SNIFF_SAMPLE = 8192  # plenty of rows to judge by; csv.Sniffer is slow on big samples
_DELIMITERS = ",;\t|"
_PAIR_SEPARATOR = "; "


def extract_csv(data: bytes) -> Extracted:
    text = decode_text(data)
    rows = csv.reader(io.StringIO(text, newline=""), _dialect(text))
    sections: list[Section] = []
    try:
        header = [_cell(name) for name in next(rows, [])]
        for row in rows:
            pairs = [
                f"{_column_name(header, index)}: {value}"
                for index, value in enumerate(_cell(value) for value in row)
                if value
            ]
            if pairs:
                sections.append(Section(text=_PAIR_SEPARATOR.join(pairs), page=None, heading=None))
    except csv.Error as exc:
        raise ExtractionError(
            f"The CSV file is malformed near line {rows.line_num}: {exc}.", code="corrupt_file"
        ) from exc
    if not sections:
        message = "The CSV file has a header row but no data rows." if any(header) else "The CSV file is empty."
        raise ExtractionError(message, code="empty_document")
    return Extracted(kind="csv", title=None, sections=sections, page_count=estimate_page_count(sections))


def _dialect(text: str) -> type[csv.Dialect] | csv.Dialect:
    sample = text[:_SNIFF_SAMPLE]
    if len(text) > _SNIFF_SAMPLE and "\n" in sample:
        sample = sample[: sample.rindex("\n")]  # never sniff a half line
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS)
    except csv.Error:
        return csv.excel


def _cell(value: str) -> str:
    return clean_text(value).replace("\n", " ")


def _column_name(header: list[str], index: int) -> str:
    name = header[index] if index < len(header) else ""
    return name or f"Column {index + 1}"
