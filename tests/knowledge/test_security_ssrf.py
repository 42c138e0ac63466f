"""Security: embedder and reranker URLs cannot reach internal addresses (issue 18, High 2)."""

from __future__ import annotations

import pytest

from knowledge.embedders.base import EmbedderError
from knowledge.embedders.openai_compat import OpenAICompatEmbedder
from knowledge.embedders.registry import validate_embedder_config
from knowledge.reranking import RerankError, rerank_scores, validate_reranker_config
from tenants.errors import ValidationFailed


@pytest.fixture
def nothing_allowed(settings):
    settings.PARLEY_OUTBOUND_ALLOWLIST = []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://169.254.169.254/v1", id="metadata_case"),
        pytest.param("http://[::ffff:10.0.0.1]/v1", id="ipv6_mapped_private_case"),
        pytest.param("http://localhost:8000/v1", id="localhost_case"),
        pytest.param("https://api.example.com/v1?key=1", id="query_case"),
    ],
)
def test_embedder_and_reranker_refuse_internal_base_urls(nothing_allowed, url):
    with pytest.raises(ValidationFailed):
        validate_embedder_config({"kind": "openai", "base_url": url, "model": "m", "dimensions": 384})
    with pytest.raises(ValidationFailed):
        validate_reranker_config({"kind": "http", "base_url": url, "model": "m"})


def test_embedder_connection_to_internal_address_refused(nothing_allowed, mock_llm):
    embedder = OpenAICompatEmbedder(base_url=mock_llm.base_url, model="mock-embedder", dimensions=384, timeout_s=2)
    try:
        with pytest.raises(EmbedderError):
            embedder.embed_query("hello")
    finally:
        embedder.close()

    assert mock_llm.state.stats()["counts"].get("embeddings", 0) == 0


def test_reranker_connection_to_internal_address_refused(nothing_allowed, mock_llm):
    config = {"kind": "http", "base_url": mock_llm.base_url, "model": "m", "api": "cohere", "timeout_s": 2}

    with pytest.raises(RerankError):
        rerank_scores(config=config, query="q", passages=["a", "b"])


@pytest.mark.django_db
def test_saving_an_embedder_or_reranker_whose_name_resolves_internally_is_refused(
    nothing_allowed, monkeypatch, tenant_pair
):
    import socket

    from django_tenants.utils import tenant_context

    from knowledge.models import KnowledgeBase
    from knowledge.services import knowledge_base_create

    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "embed.evil.example":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00:ec2::254", 443, 0, 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    url = "https://embed.evil.example/v1"
    embedder_config = {"kind": "openai", "base_url": url, "model": "m", "dimensions": 384}

    with tenant_context(tenant_pair.a):
        with pytest.raises(ValidationFailed) as embedder:
            knowledge_base_create(name="e", embedder=embedder_config)
        with pytest.raises(ValidationFailed) as reranker:
            knowledge_base_create(name="r", reranker={"kind": "http", "base_url": url, "model": "m"})
        assert not KnowledgeBase.objects.filter(name__in=["e", "r"]).exists()

    assert embedder.value.param == "embedder"
    assert reranker.value.param == "reranker"
