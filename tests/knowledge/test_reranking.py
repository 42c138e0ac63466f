"""The reranking stage: configuration, a /rerank endpoint reordering the fused candidates, and the
fused order kept whenever the endpoint fails or is too slow."""

from __future__ import annotations

import pytest
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge import services
from knowledge.models import KnowledgeBase
from knowledge.reranking import reranker_public, validate_reranker_config
from knowledge.retrieval import RetrievalTrace, retrieve
from tenants.errors import ValidationFailed
from tests.knowledge.test_retrieval import _document

pytestmark = pytest.mark.django_db

TEXTS = [
    "Refunds take five days.",  # the best BM25F match for "refund card" has one of its words
    "A refund goes back to the card you paid with.",  # the reranker (word overlap) prefers this one
    "Shipping is free above fifty euros.",
]


@pytest.fixture(autouse=True)
def _in_tenant_a(tenant_pair):
    with tenant_context(tenant_pair.a):
        yield
    connection.set_schema_to_public()


@pytest.fixture
def kb(mock_llm):
    knowledge_base = services.knowledge_base_create(
        name="kb", reranker={"kind": "http", "base_url": mock_llm.base_url, "model": "rerank-test", "timeout_s": 2}
    )
    _document(knowledge_base, "Payments", TEXTS)
    return knowledge_base


def test_configuration_is_normalised_and_its_key_never_output():
    config = validate_reranker_config(
        {"kind": "http", "base_url": "http://reranker:8080/v1/", "model": " bge ", "api_key": "secret"}
    )

    assert config == {
        "kind": "http",
        "base_url": "http://reranker:8080/v1",
        "model": "bge",
        "api": "cohere",
        "candidates": 20,
        "timeout_s": 1.0,
        "api_key": "secret",
    }
    assert "api_key" not in reranker_public(config)
    assert validate_reranker_config({}) == {}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        pytest.param({"kind": "local"}, "'kind' must be 'http'", id="kind_case"),
        pytest.param({"kind": "http", "model": "m"}, "'base_url' and 'model' are required", id="missing_case"),
        pytest.param({"kind": "http", "base_url": "ftp://x", "model": "m"}, "http", id="scheme_case"),
        pytest.param(
            {"kind": "http", "base_url": "http://x", "model": "m", "candidates": 101}, "'candidates'", id="many_case"
        ),
        pytest.param(
            {"kind": "http", "base_url": "http://x", "model": "m", "timeout_s": 0}, "'timeout_s'", id="timeout_case"
        ),
        pytest.param({"kind": "http", "base_url": "http://x", "model": "m", "top": 1}, "unknown", id="unknown_case"),
    ],
)
def test_bad_configurations_are_refused(config, message):
    with pytest.raises(ValidationFailed, match=message):
        services.knowledge_base_create(name="kb", reranker=config)
    assert not KnowledgeBase.objects.filter(name="kb").exists()


def test_the_reranker_orders_the_fused_candidates(kb, mock_llm):
    trace = RetrievalTrace()

    hits = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=2, trace=trace)

    assert [hit.text for hit in hits] == [TEXTS[1], TEXTS[0]]
    assert all(hit.reranked for hit in hits)
    assert hits[0].score == 1.0  # both query words
    assert trace.rerank_outcome == "reranked"
    assert mock_llm.count("rerank") == 1


def test_rerank_false_skips_it(kb, mock_llm):
    hits = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=2, rerank=False)

    assert not any(hit.reranked for hit in hits)
    assert mock_llm.count("rerank") == 0


@pytest.mark.parametrize(
    ("settings", "outcome"),
    [
        pytest.param({"rerank_latency": 1.0}, "timeout", id="slow_case"),
        pytest.param({"fault": "500"}, "error", id="status_case"),
    ],
)
def test_a_failing_reranker_keeps_the_fused_order(kb, mock_llm, settings, outcome):
    KnowledgeBase.objects.filter(pk=kb.pk).update(reranker={**kb.reranker, "timeout_s": 0.2})
    fused = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=2, rerank=False)
    mock_llm.configure(**settings)
    trace = RetrievalTrace()

    hits = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=2, trace=trace)

    assert [hit.chunk_id for hit in hits] == [hit.chunk_id for hit in fused]
    assert not any(hit.reranked for hit in hits)
    assert trace.rerank_outcome == outcome
    assert trace.rerank_seconds < 0.9


def test_only_the_first_candidates_are_reranked(kb, mock_llm):
    KnowledgeBase.objects.filter(pk=kb.pk).update(reranker={**kb.reranker, "candidates": 2})
    fused = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=3, rerank=False)

    hits = retrieve(knowledge_base_ids=[kb.pk], query="refund card", limit=3)

    assert [hit.reranked for hit in hits] == [True, True, False]
    assert {hit.chunk_id for hit in hits[:2]} == {hit.chunk_id for hit in fused[:2]}
    assert hits[2].chunk_id == fused[2].chunk_id
