"""Type detection and extraction: pure functions over bytes (no database, no Redis)."""

from __future__ import annotations

import codecs
import zipfile

import pytest

from knowledge.extractors import SUPPORTED_KINDS, Extracted, ExtractionError, Section, detect_kind, extract
from tests.knowledge.fixtures_docs import (
    DOCX_CONTENT_TYPE,
    DocxBlock,
    PdfPage,
    docx_bytes,
    docx_with_word_features_bytes,
    encrypted_pdf_bytes,
    image_only_pdf_bytes,
    pdf_bytes,
    zip_bomb_docx_bytes,
)


@pytest.fixture(autouse=True)
def _clean_redis():
    """Overrides the suite-wide Redis flush: these tests touch neither Redis nor the database."""


HANDBOOK_PAGES = (
    PdfPage(
        "Getting started",
        [
            "Welcome to the support handbook. " * 6,
            "Refunds are processed within five business days after the request is approved by the billing depart-\n"
            "ment, and the customer is notified by email when the money has been sent back to the card.",
        ],
        subheading="Accounts",
    ),
    PdfPage(None, ["Accounts can be closed at any time from the settings page."]),
    PdfPage("Billing", ["Invoices are sent on the first day of every month."]),
)


def handbook_pdf() -> bytes:
    return pdf_bytes(HANDBOOK_PAGES, title="Support Handbook")


def handbook_docx() -> bytes:
    return docx_bytes(
        [
            DocxBlock("paragraph", "Read this first."),
            DocxBlock("heading", "Billing", level=1),
            DocxBlock("paragraph", "We bill monthly."),
            DocxBlock("heading", "Refunds", level=2),
            DocxBlock("table", rows=[["Plan", "Refund window"], ["Pro", "30 days"], ["Team", "14 days"]]),
            DocxBlock("paragraph", "Refunds go back to the card."),
            DocxBlock("heading", "Support", level=1),
            DocxBlock("paragraph", "Write to help@example.com."),
        ],
        title="Customer Handbook",
    )


def error_of(call, *args, **kwargs) -> ExtractionError:
    with pytest.raises(ExtractionError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- detect_kind ------------------------------------------------------------------------------------


HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Pricing</title></head>"
    b"<body><h1>Plans</h1><p>Pro costs 10 EUR.</p></body></html>"
)
MARKDOWN_DOC = b"# Guide\n\nSome *text* here.\n\n## Install\n\nRun `make`.\n"
CSV_DOC = b"name,plan,seats\nAcme,pro,10\nGlobex,team,25\nInitech,pro,3\n"


@pytest.mark.parametrize(
    ("data", "filename", "declared_type", "expected"),
    [
        pytest.param(handbook_pdf(), "notes.txt", "text/plain", "pdf", id="pdf_named_txt_case"),
        pytest.param(b"junk before header\n" + handbook_pdf(), "", "", "pdf", id="pdf_header_after_junk_case"),
        pytest.param(handbook_docx(), "report.pdf", "application/pdf", "docx", id="docx_named_pdf_case"),
        pytest.param(HTML_PAGE, "page.txt", "text/plain", "html", id="html_doctype_named_txt_case"),
        pytest.param(b"<p>Hello</p>\n<p>World</p>", "", "", "html", id="html_fragment_case"),
        pytest.param(b"<p>Hello</p>\n<p>World</p>", "notes.md", "", "markdown", id="html_fragment_named_md_case"),
        pytest.param(MARKDOWN_DOC, "", "", "markdown", id="markdown_from_content_case"),
        pytest.param(MARKDOWN_DOC, "readme.txt", "", "text", id="markdown_named_txt_case"),
        pytest.param(b"Just a note.\n\nAnother one.", "notes.md", "", "markdown", id="text_named_md_case"),
        pytest.param(b"Just a note.\n\nAnother one.", "", "text/markdown", "markdown", id="text_declared_md_case"),
        pytest.param(b"Just a note, really.\n\nAnother one.", "", "", "text", id="plain_text_case"),
        pytest.param(CSV_DOC, "", "", "csv", id="csv_from_content_case"),
        pytest.param(CSV_DOC, "data.txt", "", "text", id="csv_named_txt_case"),
        pytest.param(b"a;b\n1;2\n3;4\n", "", "", "csv", id="semicolon_csv_case"),
        pytest.param(codecs.BOM_UTF8 + b"Hello there.", "", "", "text", id="utf8_bom_case"),
        pytest.param(codecs.BOM_UTF16_LE + "Grüße aus Köln.".encode("utf-16-le"), "", "", "text", id="utf16_bom_case"),
        pytest.param(b"MZ is the start of this sentence.", "", "", "text", id="weak_signature_text_case"),
        pytest.param(
            b'<html><head><meta charset="iso-8859-1"></head><body><p>caf\xe9</p></body></html>',
            "",
            "",
            "html",
            id="legacy_html_with_meta_charset_case",
        ),
    ],
)
def test_detect_kind_trusts_content_over_names(data, filename, declared_type, expected):
    assert detect_kind(data, filename=filename, declared_type=declared_type) == expected


def zip_archive(names: list[str]) -> bytes:
    import io

    output = io.BytesIO()
    with zipfile.ZipFile(output, "w") as archive:
        for name in names:
            archive.writestr(name, "<x/>")
    return output.getvalue()


@pytest.mark.parametrize(
    ("data", "filename", "expected_message"),
    [
        pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "scan.pdf", "The file is a PNG image", id="png_case"),
        pytest.param(b"\xff\xd8\xff\xe0\x00\x10JFIF", "photo.txt", "The file is a JPEG image", id="jpeg_case"),
        pytest.param(b"GIF89a\x01\x00\x01\x00", "anim.md", "The file is a GIF image", id="gif_case"),
        pytest.param(b"\x1f\x8b\x08\x00\x00\x00", "notes.txt", "The file is a gzip archive", id="gzip_case"),
        pytest.param(b"\x7fELF\x02\x01\x01\x00", "tool.pdf", "The file is an executable program", id="elf_case"),
        pytest.param(zip_archive(["a.txt", "b.txt"]), "files.docx", "The file is a ZIP archive", id="zip_case"),
        pytest.param(
            zip_archive(["[Content_Types].xml", "xl/workbook.xml"]), "sheet.docx", "an Excel workbook", id="xlsx_case"
        ),
        pytest.param(b"PK\x03\x04 not really a zip", "a.docx", "damaged or unsupported ZIP", id="broken_zip_case"),
        pytest.param(b"text\x00with\x00nul bytes", "notes.txt", "contains NUL bytes", id="nul_bytes_case"),
        pytest.param(bytes(range(256)) * 4, "data.csv", "binary data", id="random_binary_case"),
        pytest.param(bytes(range(1, 256)) * 4, "data.csv", "binary data", id="binary_without_nul_case"),
        pytest.param(
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><text>Hi</text></svg>',
            "logo.html",
            "The file is an SVG image",
            id="svg_case",
        ),
    ],
)
def test_detect_kind_rejects_binary_content(data, filename, expected_message):
    error = error_of(detect_kind, data, filename=filename)

    assert error.code == "unsupported_type"
    assert expected_message in str(error)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="zero_bytes_case"),
        pytest.param(b" \n\t\r\n  ", id="whitespace_case"),
        pytest.param(codecs.BOM_UTF8 + b"  \n", id="bom_and_whitespace_case"),
    ],
)
def test_detect_kind_rejects_empty_files(data):
    error = error_of(detect_kind, data, filename="notes.txt")

    assert error.code == "empty_document"
    assert str(error) == "The file is empty."


def test_detect_kind_reports_offset_of_invalid_utf8():
    error = error_of(detect_kind, "Prices in €: ".encode() + b"caf\xe9 au lait", filename="menu.txt")

    assert error.code == "invalid_text"
    assert str(error) == (
        "The file is not valid UTF-8 text (invalid byte at offset 18). Save it as UTF-8 and upload it again."
    )


def test_detect_kind_reads_only_the_directory_of_a_zip_bomb(monkeypatch):
    def refuse_to_decompress(*args, **kwargs):
        raise AssertionError("an entry was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", refuse_to_decompress)

    assert detect_kind(zip_bomb_docx_bytes(), filename="cv.docx", declared_type=DOCX_CONTENT_TYPE) == "docx"


# --- extract: PDF -----------------------------------------------------------------------------------


def test_extract_pdf_pages_headings_and_title():
    extracted = extract(handbook_pdf(), kind="pdf")

    assert extracted == Extracted(
        kind="pdf",
        title="Support Handbook",
        page_count=3,
        sections=[
            Section(text=("Welcome to the support handbook. " * 6).strip(), page=1, heading="Getting started"),
            Section(
                text="Refunds are processed within five business days after the request is approved by the billing "
                "department, and the customer is notified by email when the money has been sent back to the card.",
                page=1,
                heading="Getting started \u203a Accounts",
            ),
            Section(
                text="Accounts can be closed at any time from the settings page.",
                page=2,
                heading="Getting started \u203a Accounts",
            ),
            Section(text="Invoices are sent on the first day of every month.", page=3, heading="Billing"),
        ],
    )


def test_extract_pdf_without_outline_has_no_headings():
    data = pdf_bytes([PdfPage(None, ["First page."]), PdfPage(None, ["Second page."]), PdfPage(None, ["Third."])])

    extracted = extract(data, kind="pdf")

    assert [(section.text, section.page, section.heading) for section in extracted.sections] == [
        ("First page.", 1, None),
        ("Second page.", 2, None),
        ("Third.", 3, None),
    ]
    assert extracted.title is None


def test_extract_pdf_bookmark_without_heading_line_applies_from_top_of_page():
    data = pdf_bytes(
        [
            PdfPage("Intro", ["Opening words."], is_heading_printed=False),
            PdfPage("Pricing", ["Pro costs ten euros."], is_heading_printed=False),
            PdfPage(None, ["Still about pricing."]),
        ]
    )

    assert [(section.page, section.heading) for section in extract(data, kind="pdf").sections] == [
        (1, "Intro"),
        (2, "Pricing"),
        (3, "Pricing"),
    ]


def test_extract_pdf_with_empty_user_password_opens():
    data = encrypted_pdf_bytes(handbook_pdf(), user_password="")

    extracted = extract(data, kind="pdf")

    assert extracted.page_count == 3
    assert extracted.sections[-1].text == "Invoices are sent on the first day of every month."


def test_extract_pdf_with_password_is_refused():
    error = error_of(extract, encrypted_pdf_bytes(handbook_pdf(), user_password="s3cret"), kind="pdf")

    assert error.code == "encrypted_pdf"
    assert str(error) == "The PDF is password-protected. Remove the password and upload it again."


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(handbook_pdf()[: len(handbook_pdf()) // 2], id="truncated_half_case"),
        pytest.param(handbook_pdf()[:400], id="truncated_header_only_case"),
        pytest.param(b"%PDF-1.7\n" + bytes(range(256)) * 8, id="garbage_body_case"),
    ],
)
def test_extract_corrupt_pdf(data):
    error = error_of(extract, data, kind="pdf")

    assert error.code == "corrupt_file"
    assert str(error) == "The PDF file is damaged and could not be read."


def test_extract_pdf_over_page_limit():
    error = error_of(extract, handbook_pdf(), kind="pdf", max_pages=2)

    assert error.code == "too_many_pages"
    assert str(error) == "The PDF has 3 pages; the limit is 2."


def test_extract_scanned_pdf_says_ocr_is_needed():
    error = error_of(extract, image_only_pdf_bytes(), kind="pdf")

    assert error.code == "empty_document"
    assert str(error) == "The PDF has no extractable text (scanned images need OCR, which is not supported)."


# --- extract: DOCX ----------------------------------------------------------------------------------


def test_extract_docx_body_order_headings_and_tables():
    extracted = extract(handbook_docx(), kind="docx")

    assert extracted == Extracted(
        kind="docx",
        title="Customer Handbook",
        page_count=1,
        sections=[
            Section(text="Read this first.", page=None, heading=None),
            Section(text="We bill monthly.", page=None, heading="Billing"),
            Section(
                text="Plan | Refund window\nPro | 30 days\nTeam | 14 days", page=None, heading="Billing \u203a Refunds"
            ),
            Section(text="Refunds go back to the card.", page=None, heading="Billing \u203a Refunds"),
            Section(text="Write to help@example.com.", page=None, heading="Support"),
        ],
    )


def test_extract_docx_content_controls_outline_levels_and_merged_cells():
    extracted = extract(docx_with_word_features_bytes(), kind="docx")

    assert extracted.sections == [
        Section(text="Before.", page=None, heading="Top"),
        Section(text="Inside a content control.", page=None, heading="Top \u203a Custom heading"),
        Section(text="Merged | C\nx | z", page=None, heading="Top \u203a Custom heading"),
    ]


def test_extract_docx_title_style_when_core_title_is_missing():
    data = docx_bytes([DocxBlock("title", "Onboarding Guide"), DocxBlock("paragraph", "Welcome aboard.")])

    extracted = extract(data, kind="docx")

    assert extracted.title == "Onboarding Guide"
    assert extracted.sections == [Section(text="Welcome aboard.", page=None, heading=None)]


@pytest.mark.parametrize(
    ("uncompressed_bytes", "expected_message"),
    [
        pytest.param(
            2 * 1024 * 1024 * 1024, "The Word file unpacks to 2048 MB, more than the 200 MB limit.", id="over_size_case"
        ),
        pytest.param(64 * 1024 * 1024, "The Word file is compressed implausibly well (1011:1)", id="absurd_ratio_case"),
    ],
)
def test_extract_zip_bomb_docx_is_refused_before_unpacking(monkeypatch, uncompressed_bytes, expected_message):
    data = zip_bomb_docx_bytes(uncompressed_bytes=uncompressed_bytes)

    def refuse_to_decompress(*args, **kwargs):
        raise AssertionError("an entry was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", refuse_to_decompress)

    error = error_of(extract, data, kind="docx")

    assert error.code == "archive_too_large"
    assert str(error).startswith(expected_message)


def test_extract_docx_over_custom_size_limit():
    error = error_of(extract, handbook_docx(), kind="docx", max_uncompressed_bytes=1000)

    assert error.code == "archive_too_large"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(handbook_docx()[: len(handbook_docx()) // 2], id="truncated_case"),
        pytest.param(zip_archive(["word/document.xml"]), id="no_package_parts_case"),
        pytest.param(b"PK\x03\x04" + bytes(200), id="zip_signature_only_case"),
    ],
)
def test_extract_corrupt_docx(data):
    error = error_of(extract, data, kind="docx")

    assert error.code == "corrupt_file"
    assert str(error).startswith("The Word")


# --- extract: HTML ----------------------------------------------------------------------------------


def test_extract_html_drops_chrome_and_builds_heading_paths():
    page = b"""<!DOCTYPE html>
    <html><head><title> Help   Centre </title><style>p { color: red }</style><script>var x = 1;</script></head>
    <body>
      <header><a href="/">Home</a></header>
      <nav><ul><li>Menu item</li></ul></nav>
      <h1>Billing</h1>
      <p>Pay   by <b>card</b> or
         invoice.<br>Invoices are monthly.</p>
      <h2>Refunds</h2>
      <ul><li>Within 30 days</li><li>To the original card</li></ul>
      <table><tr><th>Plan</th><th>Window</th></tr><tr><td>Pro</td><td>30 days</td></tr></table>
      <h2>Limits</h2>
      <pre>max_seats = 10
  burst = 2</pre>
      <aside>Related articles</aside>
      <form><input name="q"><button>Search</button></form>
      <footer>&copy; Example</footer>
      <!-- a comment -->
    </body></html>"""

    extracted = extract(page, kind="html")

    assert extracted == Extracted(
        kind="html",
        title="Help Centre",
        page_count=1,
        sections=[
            Section(text="Pay by card or invoice.\nInvoices are monthly.", page=None, heading="Billing"),
            Section(text="Within 30 days", page=None, heading="Billing \u203a Refunds"),
            Section(text="To the original card", page=None, heading="Billing \u203a Refunds"),
            Section(text="Plan | Window\nPro | 30 days", page=None, heading="Billing \u203a Refunds"),
            Section(text="max_seats = 10\n  burst = 2", page=None, heading="Billing \u203a Limits"),
        ],
    )


def test_extract_html_decodes_declared_legacy_charset():
    page = b'<html><head><meta charset="windows-1252"><title>Caf\xe9</title></head><body><p>Cr\xe8me</p></body></html>'

    extracted = extract(page, kind="html")

    assert extracted.title == "Café"
    assert extracted.sections == [Section(text="Crème", page=None, heading=None)]


def test_extract_html_layout_table_is_walked_and_data_table_rendered():
    page = (
        b"<html><body><table><tr>"
        b"<td><h1>Site</h1><p>Welcome text.</p></td>"
        b"<td><table><tr><th>Plan</th><th>Seats</th></tr><tr><td>Pro</td><td>10</td></tr></table></td>"
        b"</tr></table></body></html>"
    )

    assert extract(page, kind="html").sections == [
        Section(text="Welcome text.", page=None, heading="Site"),
        Section(text="Plan | Seats\nPro | 10", page=None, heading="Site"),
    ]


def test_extract_html_survives_deep_nesting():
    page = b"<html><body>" + b"<div>" * 5000 + b"deep text" + b"</div>" * 5000 + b"</body></html>"

    assert extract(page, kind="html").sections == [Section(text="deep text", page=None, heading=None)]


# --- extract: Markdown, text, CSV -------------------------------------------------------------------


def test_extract_markdown_headings_code_and_title():
    document = b"""Guide
=====

Intro paragraph
wrapped over two lines.

## Install ##

Run this:

```bash
  make install

  make test
```

Setup notes
-----------

- first step
- second step

# Appendix

Last words.
"""

    extracted = extract(document, kind="markdown")

    assert extracted == Extracted(
        kind="markdown",
        title="Guide",
        page_count=1,
        sections=[
            Section(text="Intro paragraph\nwrapped over two lines.", page=None, heading="Guide"),
            Section(text="Run this:", page=None, heading="Guide \u203a Install"),
            Section(text="```bash\n  make install\n\n  make test\n```", page=None, heading="Guide \u203a Install"),
            Section(text="- first step\n- second step", page=None, heading="Guide \u203a Setup notes"),
            Section(text="Last words.", page=None, heading="Appendix"),
        ],
    )


def test_extract_markdown_closing_hashes_and_hashtags():
    document = b"## Pricing ##\n\nText.\n\n# C# #\n\n#hashtag is not a heading\n"

    assert extract(document, kind="markdown").sections == [
        Section(text="Text.", page=None, heading="Pricing"),
        Section(text="#hashtag is not a heading", page=None, heading="C#"),
    ]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[" * 60_000, id="open_brackets_case"),
        pytest.param(b"# " + b" " * 60_000 + b"x\n\nBody.", id="heading_of_spaces_case"),
        pytest.param(b"<!--" + b"a" * 60_000, id="unclosed_comment_case"),
        pytest.param(b"- " * 30_000 + b"x", id="dashes_case"),
        pytest.param((b'"a",' * 5_000 + b"\n") * 3, id="wide_quoted_csv_case"),
    ],
)
def test_pathological_text_is_handled_without_backtracking_blowup(data):
    kind = detect_kind(data)

    assert extract(data, kind=kind).sections


def test_extract_text_paragraphs_and_cleaning():
    data = codecs.BOM_UTF8 + "First   line\r\nsame\tparagraph.\r\n \r\nCafe\u0301 \x07bell\u200b.\n\n\n\nEnd.".encode()

    extracted = extract(data, kind="text")

    assert extracted == Extracted(
        kind="text",
        title=None,
        page_count=1,
        sections=[
            Section(text="First line\nsame paragraph.", page=None, heading=None),
            Section(text="Caf\u00e9 bell\u200b.", page=None, heading=None),
            Section(text="End.", page=None, heading=None),
        ],
    )


def test_extract_text_utf16_with_bom():
    data = codecs.BOM_UTF16_BE + "Grüße\n\naus Köln".encode("utf-16-be")

    assert [section.text for section in extract(data, kind="text").sections] == ["Grüße", "aus Köln"]


@pytest.mark.parametrize(
    ("data", "expected_message"),
    [
        pytest.param(
            b"abc\x00def",
            "The file contains a NUL byte at offset 3; it looks like binary data, not text.",
            id="nul_byte_case",
        ),
        pytest.param(
            b"ok \xc3\x28",
            "The file is not valid UTF-8 text (invalid byte at offset 3). Save it as UTF-8 and upload it again.",
            id="invalid_utf8_case",
        ),
        pytest.param(
            codecs.BOM_UTF8 + b"ok \xff",
            "The file is not valid UTF-8 text (invalid byte at offset 6). Save it as UTF-8 and upload it again.",
            id="invalid_utf8_after_bom_case",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["text", "markdown", "csv", "html"])
def test_extract_text_kinds_refuse_invalid_text(kind, data, expected_message):
    error = error_of(extract, data, kind=kind)

    assert error.code == "invalid_text"
    assert str(error) == expected_message


def test_extract_csv_rows_as_labelled_values():
    data = b'name;plan;note\nAcme;pro;"multi\nline"\nGlobex;;\n\nInitech;team;ok;extra\n'

    extracted = extract(data, kind="csv")

    assert extracted.sections == [
        Section(text="name: Acme; plan: pro; note: multi line", page=None, heading=None),
        Section(text="name: Globex", page=None, heading=None),
        Section(text="name: Initech; plan: team; note: ok; Column 4: extra", page=None, heading=None),
    ]
    assert (extracted.title, extracted.page_count) == (None, 1)


def test_extract_csv_header_without_rows():
    error = error_of(extract, b"name,plan\n", kind="csv")

    assert error.code == "empty_document"
    assert str(error) == "The CSV file has a header row but no data rows."


# --- extract: across kinds --------------------------------------------------------------------------


def test_page_count_estimate_for_flowing_text():
    data = ("word " * 1200).encode()

    assert extract(data, kind="text").page_count == 3


@pytest.mark.parametrize("kind", ["text", "markdown", "html", "csv"])
def test_extract_whitespace_only_is_empty(kind):
    assert error_of(extract, b" \n \n", kind=kind).code == "empty_document"


def test_extract_unknown_kind():
    error = error_of(extract, b"hello", kind="xlsx")

    assert error.code == "unsupported_type"
    assert str(error) == "Documents of kind 'xlsx' are not supported."


def test_supported_kinds():
    assert SUPPORTED_KINDS == ("pdf", "docx", "html", "markdown", "text", "csv")


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        pytest.param(handbook_pdf(), "a.pdf", id="pdf_case"),
        pytest.param(handbook_docx(), "a.docx", id="docx_case"),
        pytest.param(HTML_PAGE, "a.html", id="html_case"),
        pytest.param(MARKDOWN_DOC, "a.md", id="markdown_case"),
        pytest.param(CSV_DOC, "a.csv", id="csv_case"),
        pytest.param(b"Plain words.", "a.txt", id="text_case"),
    ],
)
def test_detected_kind_extracts_clean_sections(data, filename):
    kind = detect_kind(data, filename=filename)

    extracted = extract(data, kind=kind)

    assert extracted.kind == kind
    assert extracted.sections
    assert all(section.text and section.text == section.text.strip() for section in extracted.sections)
    assert all("\x00" not in section.text for section in extracted.sections)
