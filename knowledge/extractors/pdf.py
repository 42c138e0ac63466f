"""PDF text with pypdf: page by page, wrapped lines joined into paragraphs, headings from the outline."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError
from pypdf.generic import Destination

from knowledge.extractors.base import Extracted, Section, clean_text, clean_title, heading_path
from knowledge.extractors.errors import ExtractionError

SCANNED_MESSAGE = "The PDF has no extractable text (scanned images need OCR, which is not supported)."
# A line shorter than this share of the page's longest line ended before the margin: it closes a
# paragraph (or is a heading) rather than being wrapped.
_SHORT_LINE_SHARE = 0.75
_MAX_OUTLINE_ENTRIES = 10_000
_BULLET = re.compile(r"^(?:[\u2022\u25e6\u25aa\u2023\u2219\u00b7*\u2013-]\s|\(?\d{1,3}[.)]\s|\(?[a-z][.)]\s)")
_HYPHENATED_END = re.compile(r"[^\W\d_]-$")


@dataclass(frozen=True, slots=True)
class _OutlineEntry:
    page_index: int
    titles: tuple[str, ...]  # the entry's title with those of its ancestors, outermost first

    @property
    def normalised_title(self) -> str:
        return _normalise(self.titles[-1])


def extract_pdf(data: bytes, *, max_pages: int) -> Extracted:
    # pypdf raises a zoo of exception types (and plain ValueError/KeyError/TypeError) on malformed
    # input; all of them mean the same thing to the uploader, so they are caught broadly and wrapped.
    try:
        reader = PdfReader(io.BytesIO(data))
        _unlock(reader)
        page_count = len(reader.pages)
    except ExtractionError:
        raise
    except FileNotDecryptedError as exc:
        raise _password_protected() from exc
    except LimitReachedError as exc:
        raise _too_large() from exc
    except DependencyError as exc:
        raise ExtractionError("The PDF uses an encryption method that is not supported.", code="encrypted_pdf") from exc
    except Exception as exc:
        raise ExtractionError("The PDF file is damaged and could not be read.", code="corrupt_file") from exc
    if page_count > max_pages:
        raise ExtractionError(f"The PDF has {page_count} pages; the limit is {max_pages}.", code="too_many_pages")
    title = _title(reader)
    outline = _outline(reader)
    sections = list(_sections(reader, outline))
    if not sections:
        raise ExtractionError(SCANNED_MESSAGE, code="empty_document")
    return Extracted(kind="pdf", title=title, sections=sections, page_count=page_count)


def _unlock(reader: PdfReader) -> None:
    # Many "encrypted" PDFs only restrict printing or copying and open with an empty user password.
    if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
        raise _password_protected()


def _password_protected() -> ExtractionError:
    return ExtractionError(
        "The PDF is password-protected. Remove the password and upload it again.", code="encrypted_pdf"
    )


def _too_large() -> ExtractionError:
    return ExtractionError(
        "The PDF contains a compressed stream that is too large to unpack.", code="archive_too_large"
    )


def _title(reader: PdfReader) -> str | None:
    try:
        metadata = reader.metadata
        return clean_title(metadata.title) if metadata is not None else None
    except Exception:  # noqa: BLE001 - a damaged info dictionary only costs the title
        return None


def _outline(reader: PdfReader) -> list[_OutlineEntry]:
    """Outline (bookmark) entries in document order; an unreadable outline is treated as none."""
    entries: list[_OutlineEntry] = []
    try:
        stack: list[tuple[Iterator[object], tuple[str, ...]]] = [(iter(reader.outline), ())]
        last_titles: tuple[str, ...] = ()
        while stack and len(entries) < _MAX_OUTLINE_ENTRIES:
            items, parents = stack[-1]
            item = next(items, None)
            if item is None:
                stack.pop()
                continue
            if isinstance(item, list):
                # A nested list holds the children of the entry just before it.
                stack.append((iter(item), last_titles))
                continue
            if not isinstance(item, Destination):
                continue
            title = clean_title(item.title)
            if title is None:
                continue
            last_titles = (*parents, title)
            page_index = reader.get_destination_page_number(item)
            if page_index is not None and page_index >= 0:
                entries.append(_OutlineEntry(page_index=page_index, titles=last_titles))
    except Exception:  # noqa: BLE001 - a damaged outline only costs the headings
        return []
    entries.sort(key=lambda entry: entry.page_index)  # stable: keeps document order within a page
    return entries


def _sections(reader: PdfReader, outline: list[_OutlineEntry]) -> Iterator[Section]:
    current: tuple[str, ...] = ()
    next_entry = 0
    for page_index, page in enumerate(reader.pages):
        try:
            raw = page.extract_text()
        except LimitReachedError as exc:
            raise _too_large() from exc
        except Exception as exc:
            raise ExtractionError(
                f"Page {page_index + 1} of the PDF is damaged and could not be read.", code="corrupt_file"
            ) from exc
        page_entries = []
        while next_entry < len(outline) and outline[next_entry].page_index <= page_index:
            if outline[next_entry].page_index == page_index:
                page_entries.append(outline[next_entry])
            else:
                current = outline[next_entry].titles
            next_entry += 1
        lines = clean_text(raw).split("\n")
        # Entries whose title is a line of the page switch the heading at that line; the others (a title
        # the text does not repeat, or one wrapped over two lines) take effect from the top of the page.
        line_set = {_normalise(line) for line in lines}
        matched = [entry for entry in page_entries if entry.normalised_title in line_set]
        for entry in page_entries:
            if matched and entry is matched[0]:
                break
            current = entry.titles
        for block in _blocks(lines, matched):
            if isinstance(block, _OutlineEntry):
                current = block.titles
            else:
                yield Section(text=block, page=page_index + 1, heading=heading_path(current))
        if page_entries:
            current = page_entries[-1].titles  # whether or not its title was found, it governs what follows


def _blocks(lines: list[str], pending: list[_OutlineEntry]) -> Iterator[str | _OutlineEntry]:
    """Paragraphs of a page, and the outline entries whose title lines separate them, in order.

    pypdf gives one string per visual line. A line ends its paragraph when it is blank, when it stops
    well short of the page's longest line (it did not wrap), or when the next line starts a list item;
    a word hyphenated at a line break is rejoined.
    """
    longest = max((len(line) for line in lines), default=0)
    paragraph: list[str] = []
    previous = ""
    for line in lines:
        heading = _take_heading(line, pending)
        if heading is not None or not line:
            if paragraph:
                yield " ".join(paragraph)
                paragraph.clear()
            if heading is not None:
                yield heading
            previous = ""
            continue
        if paragraph and (_BULLET.match(line) or len(previous) < longest * _SHORT_LINE_SHARE):
            yield " ".join(paragraph)
            paragraph.clear()
        if paragraph and _HYPHENATED_END.search(paragraph[-1]) and line[0].islower():
            paragraph[-1] = paragraph[-1][:-1] + line
        else:
            paragraph.append(line)
        previous = line
    if paragraph:
        yield " ".join(paragraph)


def _take_heading(line: str, pending: list[_OutlineEntry]) -> _OutlineEntry | None:
    normalised = _normalise(line)
    for position, entry in enumerate(pending):
        if entry.normalised_title == normalised:
            del pending[: position + 1]
            return entry
    return None


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()
