"""The mock model server itself: wire format, embeddings, vLLM metrics, run-time control, stand-alone run."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
import time

import httpx
import pytest

from chat.mock_server import embedding_vector
from chat.providers.vllm_pool import ReplicaLoad, parse_vllm_metrics

HELLO = {"model": "mock-model", "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


async def test_streams_server_sent_events_with_usage_and_done(http, mock_llm):
    mock_llm.configure(answer_tokens=2)

    response = await http.post(
        f"{mock_llm.base_url}/chat/completions",
        json={**HELLO, "stream": True, "stream_options": {"include_usage": True}},
    )

    assert response.headers["content-type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert [chunk["choices"][0]["delta"].get("content") for chunk in chunks[:-1]] == ["", "The", " quick", None]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}


async def test_stream_without_include_usage_has_no_usage_chunk(http, mock_llm):
    response = await http.post(f"{mock_llm.base_url}/chat/completions", json={**HELLO, "stream": True})

    assert '"usage"' not in response.text
    assert response.text.endswith("data: [DONE]\n\n")


async def test_admin_endpoint_flips_a_running_server_into_failing_mode_and_back(http, mock_llm):
    flipped = await http.post(f"{mock_llm.url}/_mock/config", json={"fault": "500"})
    failing = await http.post(f"{mock_llm.base_url}/chat/completions", json=HELLO)
    await http.post(f"{mock_llm.url}/_mock/reset")
    healthy = await http.post(f"{mock_llm.base_url}/chat/completions", json=HELLO)
    stats = await http.get(f"{mock_llm.url}/_mock/stats")

    assert flipped.json()["fault"] == "500"
    assert failing.status_code == 500
    assert failing.json()["error"]["type"] == "server_error"
    assert healthy.status_code == 200
    assert stats.json() == {"counts": {"chat_completions": 1}, "in_flight": 0}


@pytest.mark.parametrize(
    "changes", [{"fault": "explode"}, {"colour": "red"}, ["fault"]], ids=["bad_fault_case", "unknown_case", "list_case"]
)
async def test_admin_endpoint_rejects_bad_settings(http, mock_llm, changes):
    response = await http.post(f"{mock_llm.url}/_mock/config", json=changes)

    assert response.status_code == 400
    assert mock_llm.state.config.fault == "none"


async def test_fault_count_fails_only_that_many_requests(http, mock_llm):
    mock_llm.configure(fault="429", fault_count=2, retry_after=4)

    statuses = [(await http.post(f"{mock_llm.base_url}/chat/completions", json=HELLO)) for _ in range(3)]

    assert [response.status_code for response in statuses] == [429, 429, 200]
    assert statuses[0].headers["retry-after"] == "4"


async def test_fault_header_applies_to_one_request(http, mock_llm):
    faulted = await http.post(f"{mock_llm.base_url}/chat/completions", json=HELLO, headers={"X-Mock-Fault": "503"})
    normal = await http.post(f"{mock_llm.base_url}/chat/completions", json=HELLO)

    assert faulted.status_code == 503
    assert normal.status_code == 200


async def test_embeddings_are_deterministic_unit_vectors(http, mock_llm):
    mock_llm.configure(embedding_dimensions=8)

    first = await http.post(f"{mock_llm.base_url}/embeddings", json={"model": "e", "input": ["alpha", "beta"]})
    again = await http.post(f"{mock_llm.base_url}/embeddings", json={"model": "e", "input": "alpha"})
    packed = await http.post(
        f"{mock_llm.base_url}/embeddings", json={"model": "e", "input": "alpha", "encoding_format": "base64"}
    )

    vectors = [item["embedding"] for item in first.json()["data"]]
    assert vectors[0] == again.json()["data"][0]["embedding"] == embedding_vector("alpha", 8)
    assert vectors[0] != vectors[1]
    assert [len(vector) for vector in vectors] == [8, 8]
    assert math.isclose(sum(value * value for value in vectors[0]), 1.0)
    decoded = struct.unpack("<8f", base64.b64decode(packed.json()["data"][0]["embedding"]))
    assert [round(value, 5) for value in decoded] == [round(value, 5) for value in vectors[0]]
    assert first.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_models_lists_the_configured_model(http, mock_llm):
    response = await http.get(f"{mock_llm.base_url}/models")

    assert [model["id"] for model in response.json()["data"]] == ["mock-model"]


async def test_metrics_expose_settable_vllm_gauges_and_health_follows_the_switch(http, mock_llm):
    mock_llm.configure(num_requests_running=7, num_requests_waiting=2, kv_cache_usage=0.4, is_healthy=False)

    page = await http.get(f"{mock_llm.url}/metrics")
    health = await http.get(f"{mock_llm.url}/health")

    assert parse_vllm_metrics(page.text) == ReplicaLoad(running=7.0, waiting=2.0, kv_cache_usage=0.4)
    assert health.status_code == 503


def test_runs_on_its_own_from_the_command_line(refused_url):
    port = int(refused_url.rsplit(":", 1)[1])
    server = subprocess.Popen(
        [sys.executable, "-m", "chat.mock_server", "--port", str(port), "--answer-tokens", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.post(f"{refused_url}/v1/chat/completions", json=HELLO, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=10)

    assert response.json()["choices"][0]["message"]["content"] == "The quick brown"
