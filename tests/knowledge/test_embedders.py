"""Embedders: the bundled local model for real, config validation, and OpenAI-compatible servers over HTTP."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chat.mock_server import MockServerHandle, embedding_vector, mock_servers_in_thread
from knowledge.embedders import (
    SUPPORTED_DIMENSIONS,
    Embedder,
    EmbedderError,
    embedder_dimensions,
    get_embedder,
    validate_embedder_config,
)
from knowledge.embedders.local import LocalEmbedder
from knowledge.embedders.openai_compat import OpenAICompatEmbedder
from tenants.errors import ValidationFailed


def dot(left: list[float], right: list[float]) -> float:
    return math.fsum(a * b for a, b in zip(left, right, strict=True))


def norm(vector: list[float]) -> float:
    return math.sqrt(dot(vector, vector))


# ---------------------------------------------------------------------------------------------
# Servers


@pytest.fixture(scope="module")
def _mock_embedding_server() -> Iterator[MockServerHandle]:
    with mock_servers_in_thread(1) as servers:
        yield servers[0]


@pytest.fixture
def mock_server(_mock_embedding_server) -> MockServerHandle:
    """The project's mock OpenAI-compatible server, start configuration, counters zeroed."""
    _mock_embedding_server.reset()
    return _mock_embedding_server


class _StatusHandler(BaseHTTPRequestHandler):
    """Answers every POST to ``/status/<code>/…`` with that status and an OpenAI-style error body."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status = int(self.path.split("/")[2])
        body = json.dumps({"error": {"message": f"fault {status}", "type": "error", "code": None}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def status_server_url() -> Iterator[str]:
    """An HTTP server whose answer status is the path's second segment (the mock's embeddings never fail)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def refused_url() -> str:
    """An http URL on a loopback port where nothing listens: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel does, from the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def openai_embedder(base_url: str, **options) -> OpenAICompatEmbedder:
    config = {"kind": "openai", "base_url": base_url, "model": "mock-embedder", "dimensions": 384, **options}
    embedder = get_embedder(config)
    assert isinstance(embedder, OpenAICompatEmbedder)
    return embedder


# ---------------------------------------------------------------------------------------------
# The local embedder


def test_local_embedder_embeds_into_384_dimension_unit_vectors():
    embedder = get_embedder({"kind": "local"})

    vectors = embedder.embed_documents(["Refunds are issued within 14 days.", "Shipping is free over 50 euros."])

    assert isinstance(embedder, LocalEmbedder)
    assert isinstance(embedder, Embedder)
    assert (embedder.key, embedder.dimensions, embedder.max_input_tokens) == ("local:all-MiniLM-L6-v2", 384, 256)
    assert [len(vector) for vector in vectors] == [384, 384]
    assert all(isinstance(value, float) for value in vectors[0])
    assert [round(norm(vector), 5) for vector in vectors] == [1.0, 1.0]


def test_local_embedder_places_similar_sentences_closer_than_unrelated_ones():
    embedder = get_embedder({"kind": "local"})

    question, paraphrase, unrelated = embedder.embed_documents(
        [
            "How do I get my money back for an order?",
            "Refunds for purchases are paid back to the original card.",
            "The volcano erupted and covered the village in ash.",
        ]
    )

    assert dot(question, paraphrase) > dot(question, unrelated) + 0.2


def test_local_embed_query_matches_embed_documents():
    embedder = get_embedder({"kind": "local"})
    text = "What are your opening hours on Sunday?"

    query_vector = embedder.embed_query(text)
    document_vector = embedder.embed_documents(["Something else entirely.", text])[1]

    assert len(query_vector) == 384
    assert dot(query_vector, document_vector) == pytest.approx(1.0, abs=1e-5)


def test_local_embedder_embeds_nothing_to_nothing():
    assert get_embedder({"kind": "local"}).embed_documents([]) == []


# ---------------------------------------------------------------------------------------------
# Configuration and the registry


def test_get_embedder_shares_one_instance_per_distinct_config():
    openai_config = {
        "kind": "openai",
        "base_url": "http://embedder.internal:8000/v1/",
        "model": "bge",
        "dimensions": 768,
    }

    local = get_embedder({"kind": "local"})
    local_again = get_embedder({})
    remote = get_embedder(openai_config)
    remote_again = get_embedder({**openai_config, "base_url": "http://embedder.internal:8000/v1", "batch_size": 64})
    remote_other = get_embedder({**openai_config, "batch_size": 8})

    assert local is local_again
    assert remote is remote_again
    assert remote_other is not remote
    assert remote.key == remote_other.key == "openai:http://embedder.internal:8000/v1:bge:768"


def test_key_of_an_openai_embedder_holds_no_secret():
    embedder = get_embedder(
        {
            "kind": "openai",
            "base_url": "https://api.example.com/v1",
            "model": "m",
            "dimensions": 1536,
            "api_key": "sk-1",
        }
    )

    assert embedder.key == "openai:https://api.example.com/v1:m:1536"
    assert "sk-1" not in repr(embedder)


def test_validate_fills_in_the_defaults():
    local = validate_embedder_config({})
    remote = validate_embedder_config(
        {
            "kind": "openai",
            "base_url": " https://api.example.com/v1/ ",
            "model": "text-embedding-3-small",
            "dimensions": 1536,
        }
    )

    assert local == {"kind": "local"}
    assert remote == {
        "kind": "openai",
        "base_url": "https://api.example.com/v1",
        "model": "text-embedding-3-small",
        "dimensions": 1536,
        "send_dimensions": False,
        "batch_size": 64,
        "timeout_s": 30.0,
        "max_input_tokens": 512,
    }


def test_validate_keeps_the_given_options():
    config = {
        "kind": "openai",
        "base_url": "http://vllm:8000/v1",
        "model": "bge-m3",
        "api_key": "secret",
        "dimensions": 1024,
        "send_dimensions": True,
        "batch_size": 2048,
        "timeout_s": 5,
        "max_input_tokens": 8192,
    }

    assert validate_embedder_config(config) == {**config, "timeout_s": 5.0}


VALID_OPENAI = {"kind": "openai", "base_url": "https://api.example.com/v1", "model": "m", "dimensions": 768}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        pytest.param(["local"], "must be an object", id="not_an_object_case"),
        pytest.param({"kind": "cohere"}, "unknown kind 'cohere'", id="unknown_kind_case"),
        pytest.param({"kind": "local", "model": "x"}, "unknown field(s) model", id="local_unknown_field_case"),
        pytest.param({"kind": "local", "dimensions": 768}, "has 384 dimensions", id="local_wrong_dimensions_case"),
        pytest.param({**VALID_OPENAI, "colour": "red"}, "unknown field(s) colour", id="openai_unknown_field_case"),
        pytest.param(
            {k: v for k, v in VALID_OPENAI.items() if k != "base_url"}, "'base_url' is required", id="no_url_case"
        ),
        pytest.param(
            {k: v for k, v in VALID_OPENAI.items() if k != "model"}, "'model' is required", id="no_model_case"
        ),
        pytest.param(
            {k: v for k, v in VALID_OPENAI.items() if k != "dimensions"}, "'dimensions' is required", id="no_dims_case"
        ),
        pytest.param({**VALID_OPENAI, "dimensions": 512}, "one of 384, 768, 1024, 1536", id="unsupported_dims_case"),
        pytest.param({**VALID_OPENAI, "dimensions": "768"}, "one of 384", id="string_dims_case"),
        pytest.param({**VALID_OPENAI, "dimensions": 768.0}, "one of 384", id="float_dims_case"),
        pytest.param({**VALID_OPENAI, "base_url": "ftp://example.com"}, "http(s) URL", id="ftp_url_case"),
        pytest.param({**VALID_OPENAI, "base_url": "example.com/v1"}, "http(s) URL", id="relative_url_case"),
        pytest.param({**VALID_OPENAI, "base_url": "http://host:port/v1"}, "http(s) URL", id="bad_port_case"),
        pytest.param({**VALID_OPENAI, "base_url": "https://u:p@example.com"}, "credentials", id="credentials_case"),
        pytest.param({**VALID_OPENAI, "base_url": "https://example.com/?a=1"}, "query", id="query_case"),
        pytest.param({**VALID_OPENAI, "model": " "}, "'model' must be a non-empty", id="blank_model_case"),
        pytest.param({**VALID_OPENAI, "api_key": 123}, "'api_key' must be a non-empty", id="numeric_key_case"),
        pytest.param(
            {**VALID_OPENAI, "batch_size": 0}, "'batch_size' must be an integer from 1 to 2048", id="zero_batch_case"
        ),
        pytest.param({**VALID_OPENAI, "batch_size": 4096}, "from 1 to 2048", id="huge_batch_case"),
        pytest.param({**VALID_OPENAI, "batch_size": True}, "from 1 to 2048", id="bool_batch_case"),
        pytest.param({**VALID_OPENAI, "timeout_s": 0}, "'timeout_s' must be", id="zero_timeout_case"),
        pytest.param({**VALID_OPENAI, "timeout_s": float("nan")}, "'timeout_s' must be", id="nan_timeout_case"),
        pytest.param({**VALID_OPENAI, "send_dimensions": "yes"}, "true or false", id="string_flag_case"),
    ],
)
def test_validate_rejects_bad_configs(config, fragment):
    with pytest.raises(ValidationFailed) as caught:
        validate_embedder_config(config)

    assert caught.value.param == "embedder"
    assert fragment in caught.value.message
    assert caught.value.message.startswith("embedder: ")


def test_validation_errors_never_echo_the_api_key():
    with pytest.raises(ValidationFailed) as caught:
        validate_embedder_config({**VALID_OPENAI, "api_key": "sk-very-secret", "dimensions": 3})

    assert "sk-very-secret" not in caught.value.message


@pytest.mark.parametrize("dimensions", SUPPORTED_DIMENSIONS, ids=[f"{size}_case" for size in SUPPORTED_DIMENSIONS])
def test_embedder_dimensions_of_openai_configs(dimensions):
    assert embedder_dimensions({**VALID_OPENAI, "dimensions": dimensions}) == dimensions


def test_embedder_dimensions_of_the_local_embedder():
    assert embedder_dimensions({}) == embedder_dimensions({"kind": "local"}) == 384


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible servers


def test_openai_embedder_returns_the_servers_vectors_in_order(mock_server):
    embedder = openai_embedder(mock_server.base_url)
    texts = ["alpha", "beta", "gamma"]

    vectors = embedder.embed_documents(texts)
    query_vector = embedder.embed_query("beta")

    assert len(vectors) == 3
    for vector, text in zip(vectors, texts, strict=True):
        assert vector == pytest.approx(embedding_vector(text, 384), abs=1e-6)
    assert query_vector == pytest.approx(vectors[1], abs=1e-6)
    assert mock_server.count("embeddings") == 2


def test_openai_embedder_splits_a_big_input_into_batches(mock_server):
    embedder = openai_embedder(mock_server.base_url, batch_size=4)
    texts = [f"passage number {index}" for index in range(10)]

    vectors = embedder.embed_documents(texts)

    assert mock_server.count("embeddings") == 3  # 4 + 4 + 2
    assert [
        vector == pytest.approx(embedding_vector(text, 384), abs=1e-6)
        for vector, text in zip(vectors, texts, strict=True)
    ] == [True] * 10


def test_openai_embedder_embeds_nothing_without_a_request(mock_server):
    assert openai_embedder(mock_server.base_url).embed_documents([]) == []
    assert mock_server.count("embeddings") == 0


def test_openai_embedder_asks_for_its_dimensions_when_configured_to(mock_server):
    embedder = openai_embedder(mock_server.base_url, dimensions=768, send_dimensions=True)

    vector = embedder.embed_query("alpha")

    assert len(vector) == 768
    assert vector == pytest.approx(embedding_vector("alpha", 768), abs=1e-6)
    assert norm(vector) == pytest.approx(1.0)


def test_openai_embedder_refuses_vectors_of_the_wrong_size(mock_server):
    embedder = openai_embedder(mock_server.base_url, dimensions=768)  # the mock answers with 384

    with pytest.raises(EmbedderError) as caught:
        embedder.embed_documents(["alpha"])

    assert caught.value.is_transient is False
    assert "returned vectors of 384 dimensions" in caught.value.message
    assert "configured for 768" in caught.value.message


@pytest.mark.parametrize(
    ("status", "is_transient", "fragment"),
    [
        pytest.param(429, True, "rate limiting", id="429_case"),
        pytest.param(500, True, "HTTP 500: fault 500", id="500_case"),
        pytest.param(503, True, "HTTP 503", id="503_case"),
        pytest.param(400, False, "rejected the request (HTTP 400): fault 400", id="400_case"),
        pytest.param(401, False, "refused the API key (HTTP 401)", id="401_case"),
        pytest.param(404, False, "does not know model 'mock-embedder'", id="404_case"),
    ],
)
def test_openai_embedder_error_statuses(status_server_url, status, is_transient, fragment):
    embedder = openai_embedder(f"{status_server_url}/status/{status}", api_key="sk-secret")

    with pytest.raises(EmbedderError) as caught:
        embedder.embed_documents(["alpha"])

    assert caught.value.is_transient is is_transient
    assert fragment in caught.value.message
    assert "sk-secret" not in caught.value.message


def test_openai_embedder_server_down_is_transient(refused_url):
    embedder = openai_embedder(f"{refused_url}/v1")

    with pytest.raises(EmbedderError) as caught:
        embedder.embed_query("alpha")

    assert caught.value.is_transient is True
    assert caught.value.message.startswith(f"Could not connect to The embedding server at {refused_url}/v1")


def test_openai_embedder_timeout_is_transient(silent_url):
    embedder = openai_embedder(f"{silent_url}/v1", timeout_s=0.5)
    started = time.monotonic()

    with pytest.raises(EmbedderError) as caught:
        embedder.embed_query("alpha")

    assert caught.value.is_transient is True
    assert "did not answer within 0.5 s" in caught.value.message
    assert time.monotonic() - started < 3
