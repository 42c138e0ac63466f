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
