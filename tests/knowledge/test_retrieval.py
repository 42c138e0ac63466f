"""Retrieval: BM25F with per-knowledge-base statistics, MaxScore's bound, fusion."""

from __future__ import annotations

import pytest
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge import retrieval, services
from knowledge.extractors.base import HEADING_SEPARATOR
from knowledge.models import Chunk, Document, DocumentTerm
from knowledge.retrieval import RetrievalTrace, retrieve

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _in_tenant_a(tenant_pair):
    with tenant_context(tenant_pair.a):
        yield
    connection.set_schema_to_public()


def _unit(index: int) -> list[float]:
    vector = [0.0] * 384
    vector[index % 384] = 1.0
    return vector


def _document(kb, title: str, texts: list[str], heading: str = "") -> Document:
    """A ready document with these chunks (no model: the embeddings are axis vectors)."""
    document = Document.objects.create(
        knowledge_base=kb,
        title=title,
        status=Document.Status.READY,
        chunk_count=len(texts),
        token_count=sum(len(text.split()) for text in texts),
    )
    Chunk.objects.bulk_create(
        Chunk(
            document=document,
            knowledge_base=kb,
            position=position,
            text=text,
            heading=heading,
            title=title,
            token_count=len(text.split()),
            dimensions=384,
            embedding=_unit(document.pk * 7 + position),
        )
        for position, text in enumerate(texts)
    )
    services.document_terms_refresh(document_id=document.pk)
    return document


def _texts(hits) -> list[str]:
    return [hit.text for hit in hits]


def test_document_terms_count_chunks_per_lexeme():
    kb = services.knowledge_base_create(name="kb")
    document = _document(
        kb, "Billing", ["Invoices are sent monthly.", "Invoices list every seat.", "Seats cost extra."]
    )

    counts = dict(DocumentTerm.objects.filter(document=document).values_list("lexeme", "chunks"))

    assert counts["invoic"] == 2  # stemmed, as the search vector holds it
    assert counts["seat"] == 2
    assert counts["bill"] == 3  # the title ("Billing") is in every chunk's vector
    services.document_delete(document=document)
    assert not DocumentTerm.objects.filter(knowledge_base=kb).exists()


def test_rare_word_outweighs_common_word():
    """ts_rank_cd has no idf: both chunks below would tie on one matching word each."""
    kb = services.knowledge_base_create(name="kb")
    _document(kb, "Guide", [f"The widget supports export number {index}." for index in range(20)])
    _document(kb, "Refunds", ["A refund is possible within thirty days."])

    hits = retrieve(knowledge_base_ids=[kb.pk], query="widget refund", limit=3, mode="text")

    assert hits[0].text == "A refund is possible within thirty days."
    assert hits[0].text_rank == 1


def test_statistics_are_per_knowledge_base():
    """'refund' is common in one knowledge base and rare in the other: idf follows the searched one."""
    common = services.knowledge_base_create(name="refunds everywhere")
    _document(common, "Policy", [f"Refund rule {index}: refunds need a receipt." for index in range(10)])
    _document(common, "Gift cards", ["Gift cards never expire."])
    rare = services.knowledge_base_create(name="refunds rare")
    _document(rare, "Policy", ["Refund within thirty days."])
    _document(rare, "Cards", [f"Gift cards note {index}: cards are gifts." for index in range(10)])

    in_common = retrieve(knowledge_base_ids=[common.pk], query="refund gift", limit=1, mode="text")
    in_rare = retrieve(knowledge_base_ids=[rare.pk], query="refund gift", limit=1, mode="text")

    assert _texts(in_common) == ["Gift cards never expire."]
    assert _texts(in_rare) == ["Refund within thirty days."]


def test_title_and_heading_words_are_searchable_and_weighted():
    kb = services.knowledge_base_create(name="kb")
    _document(kb, "Passwords", ["Use the link in the email."])
    _document(kb, "Security", ["Codes come by text message."], heading=f"Passwords{HEADING_SEPARATOR}Policy")
    _document(kb, "Misc", ["Passwords are stored hashed, encrypted."])

    parameters = retrieval.RankingParameters(title_weight=3.0, heading_weight=2.0)

    hits = retrieve(knowledge_base_ids=[kb.pk], query="passwords", limit=3, mode="text", parameters=parameters)

    # One occurrence each, in texts of one length: in the title (weight 3), the heading (2), the text (1).
    assert _texts(hits) == [
        "Use the link in the email.",
        "Codes come by text message.",
        "Passwords are stored hashed, encrypted.",
    ]


def _thirty_documents(kb) -> None:
    for index in range(30):
        words = (
            ["account"] * (1 + index % 3) + (["invoice"] if index % 4 == 0 else []) + (["vat"] if index == 8 else [])
        )
        _document(kb, f"Doc {index}", [" ".join(words) + f" item {index}."])


def test_maxscore_passes_give_the_exhaustive_ranking(monkeypatch):
    """Scoring the rarest lexemes' matches first, then only what could still enter the list, ranks
    exactly as scoring every match at once does."""
    kb = services.knowledge_base_create(name="kb")
    _thirty_documents(kb)
    query = "account invoice vat"
    parameters = retrieval.RankingParameters(depth=10)
    everything = retrieve(knowledge_base_ids=[kb.pk], query=query, limit=10, mode="text", parameters=parameters)
    monkeypatch.setattr(retrieval, "MATCHES_PER_PASS", 1)
    trace = RetrievalTrace()

    passes = retrieve(
        knowledge_base_ids=[kb.pk], query=query, limit=10, mode="text", parameters=parameters, trace=trace
    )

    assert [hit.chunk_id for hit in passes] == [hit.chunk_id for hit in everything]
    assert len(passes) == 10
    assert trace.passes == [1, 1, 1]  # vat, then invoice's other matches, then account's
    assert trace.scored_matches == 30
    assert trace.text_exact is True
    assert passes[0].text == "account account account invoice vat item 8."


def test_maxscore_budget_stops_and_says_so(monkeypatch):
    kb = services.knowledge_base_create(name="kb")
    _thirty_documents(kb)
    monkeypatch.setattr(retrieval, "MAX_SCORED_MATCHES", 5)
    trace = RetrievalTrace()

    hits = retrieve(knowledge_base_ids=[kb.pk], query="account invoice vat", limit=10, mode="text", trace=trace)

    # The chunk holding all three words first (1), vat's other matches (none), then invoice's 7 other
    # matches cut at the 4 the budget leaves: account is never searched.
    assert trace.passes == [1, 1]
    assert trace.scored_matches == 5
    assert trace.text_exact is False
    assert len(hits) == 5
    assert hits[0].text == "account account account invoice vat item 8."


def test_maxscore_stops_when_nothing_unscored_can_enter(monkeypatch):
    monkeypatch.setattr(retrieval, "MATCHES_PER_PASS", 1)
    kb = services.knowledge_base_create(name="kb")
    _document(kb, "Rare", ["zebra crossing rules"])
    for index in range(40):
        _document(kb, f"Common {index}", [f"rules and more rules, part {index}"])
    trace = RetrievalTrace()

    hits = retrieve(
        knowledge_base_ids=[kb.pk],
        query="zebra rules",
        limit=1,
        mode="text",
        parameters=retrieval.RankingParameters(depth=1),
        trace=trace,
    )

    assert _texts(hits) == ["zebra crossing rules"]
    assert trace.passes == [1]  # "rules" (in 41 chunks) could not beat the zebra chunk's score
    assert trace.scored_matches == 1
    assert trace.text_exact is True


def test_lexemes_with_quotes_and_backslashes_are_quoted():
    kb = services.knowledge_base_create(name="kb")
    _document(kb, "Odd", ["path c:\\temp\\o'brien file"])

    hits = retrieve(knowledge_base_ids=[kb.pk], query="c:\\temp\\o'brien", limit=3, mode="text")

    assert _texts(hits) == ["path c:\\temp\\o'brien file"]


def test_hybrid_fuses_both_lists():
    kb = services.knowledge_base_create(name="kb")
    document = _document(kb, "Doc", ["alpha beta", "gamma delta"])
    vector_only = Chunk.objects.get(document=document, position=1)

    hits = retrieve(knowledge_base_ids=[kb.pk], query="alpha", limit=2)

    assert hits[0].text == "alpha beta"
    assert hits[0].text_rank == 1
    assert {hit.chunk_id for hit in hits} == {hits[0].chunk_id, vector_only.pk}
    assert all(hit.vector_rank is not None for hit in hits)


@pytest.mark.parametrize(
    ("query", "parts"),
    [
        pytest.param("radius and center of a graph", ["radius", "center of a graph"], id="and_case"),
        pytest.param("argmax versus max: what is returned?", ["argmax", "max: what is returned"], id="versus_case"),
        pytest.param("Is my graph a tree?", [], id="one_part_case"),
    ],
)
def test_query_parts(query, parts):
    assert retrieval._query_parts(query) == parts


def test_dotted_and_snake_case_names_are_searchable_by_their_words():
    """PostgreSQL's parser would keep "numpy.linspace" or "refund_policy.pdf" as one token."""
    kb = services.knowledge_base_create(name="kb")
    _document(kb, "numpy.linspace", ["Evenly spaced numbers over an interval."])
    _document(kb, "refund_policy.pdf", ["Version 3.5 of the rules."])

    by_title_word = retrieve(knowledge_base_ids=[kb.pk], query="linspace", limit=2, mode="text")
    by_whole_name = retrieve(knowledge_base_ids=[kb.pk], query="refund_policy.pdf", limit=2, mode="text")
    by_number = retrieve(knowledge_base_ids=[kb.pk], query="3.5", limit=2, mode="text")

    assert _texts(by_title_word) == ["Evenly spaced numbers over an interval."]
    assert _texts(by_whole_name) == ["Version 3.5 of the rules."]
    assert _texts(by_number) == ["Version 3.5 of the rules."]


def test_documents_are_fused_by_their_best_chunk():
    """A document cut into many chunks does not fill the list: each document leads with its best
    chunk, in the documents' fused order, and its other chunks follow."""
    kb = services.knowledge_base_create(name="kb")
    long = _document(kb, "Long", [f"invoice numbering rule {index}: invoices are numbered" for index in range(6)])
    short = _document(kb, "Short", ["Invoices can be paid by card."])
    plain = retrieval.RankingParameters(by_document=False)

    by_chunk = retrieve(knowledge_base_ids=[kb.pk], query="invoice", limit=3, mode="text", parameters=plain)
    by_document = retrieve(knowledge_base_ids=[kb.pk], query="invoice", limit=3, mode="text")

    assert [hit.document_id for hit in by_chunk] == [long.pk, long.pk, long.pk]
    assert [hit.document_id for hit in by_document] == [long.pk, short.pk, long.pk]


def test_a_document_filter_restricts_both_lists():
    kb = services.knowledge_base_create(name="kb")
    first = _document(kb, "First", ["Invoices are monthly."])
    second = _document(kb, "Second", ["Invoices are yearly."])

    hits = retrieve(knowledge_base_ids=[kb.pk], query="invoices", limit=5, document_ids=[second.pk])

    assert [hit.document_id for hit in hits] == [second.pk]
    assert first.pk not in {hit.document_id for hit in hits}
