"""OpenAI-compatible providers against the mock server: answers, usage, and each fault as its typed error.

Every test runs with both clients (the openai SDK and the lean aiohttp one): they must not differ.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from chat.mock_server import ANSWER_TEXT
from chat.providers import openai_compat
from chat.providers.base import (
    BadRequest,
    ChatRequest,
    Completion,
    ContextTooLong,
    Delta,
    Provider,
    RateLimited,
    StreamEvent,
    Timeout,
    Unavailable,
    Usage,
    collect,
    estimate_prompt_tokens,
    estimate_tokens,
)
from chat.providers.openai_compat import CLIENTS, OpenAICompatProvider, openai_compat_provider, retry_after_seconds

HELLO = [{"role": "user", "content": "Hello there"}]
HELLO_PROMPT_TOKENS = 6  # the mock counts 4 per message plus one per word
TWENTY_TOKENS = " ".join(ANSWER_TEXT.split()[:20])


async def answer(provider: Provider, request: ChatRequest, *, mode: str) -> Completion:
    """The same call through either interface: streamed and collected, or whole."""
    if mode == "stream":
        return await collect(provider.stream(request))
    return await provider.complete(request)


async def drain(events: AsyncIterator[StreamEvent], *, into: list[str]) -> None:
    async for event in events:
        if isinstance(event, Delta):
            into.append(event.text)


@pytest.fixture(params=CLIENTS, ids=[f"{client}_case" for client in CLIENTS])
async def make_provider(request):
    """Builds providers with the client under test; closes them afterwards."""
    made: list[OpenAICompatProvider] = []

    def make(base_url: str, **options) -> OpenAICompatProvider:
        options = {"model": "mock-model", **options}
        made.append(openai_compat_provider(client=request.param, base_url=base_url, **options))
        return made[-1]

    yield make
    for provider in made:
        await provider.aclose()


@pytest.fixture
def provider(make_provider, mock_llm) -> OpenAICompatProvider:
    return make_provider(mock_llm.base_url, api_key="test-key", timeout=5)


async def test_stream_yields_the_answer_and_the_servers_usage(provider, mock_llm):
    events = [event async for event in provider.stream(ChatRequest(messages=HELLO))]

    assert "".join(event.text for event in events if isinstance(event, Delta)) == TWENTY_TOKENS
    assert events[-1] == Usage(
        prompt_tokens=HELLO_PROMPT_TOKENS,
        completion_tokens=20,
        finish_reason="stop",
        provider="openai",
        model="mock-model",
    )
    deltas = [event for event in events if isinstance(event, Delta)]
    # All at once from the mock: the SDK yields its chunks one by one, the lean client one delta
    # per read from the socket (the burst, in as many pieces as the network gave it).
    assert 1 <= len(deltas) <= 20
    assert all(delta.text for delta in deltas)
    assert mock_llm.count() == 1


async def test_a_paced_stream_gives_one_delta_per_token(provider, mock_llm):
    mock_llm.configure(tokens_per_second=200)  # 5 ms apart: every token is a read of its own

    events = [event async for event in provider.stream(ChatRequest(messages=HELLO))]

    deltas = [event.text for event in events if isinstance(event, Delta)]
    assert "".join(deltas) == TWENTY_TOKENS
    assert len(deltas) == 20


async def test_complete_makes_one_non_streaming_call(provider, mock_llm):
    completion = await provider.complete(ChatRequest(messages=HELLO))

    assert completion.text == TWENTY_TOKENS
    assert completion.usage == Usage(
        prompt_tokens=HELLO_PROMPT_TOKENS,
        completion_tokens=20,
        finish_reason="stop",
        provider="openai",
        model="mock-model",
    )
    assert mock_llm.count() == 1


async def test_max_tokens_reaches_the_server(provider):
    completion = await provider.complete(ChatRequest(messages=HELLO, max_tokens=5))

    assert completion.text == "The quick brown fox jumps"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.finish_reason == "length"


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
async def test_usage_is_estimated_when_the_server_reports_none(provider, mock_llm, mode):
    mock_llm.configure(is_usage_reported=False)
    request = ChatRequest(messages=HELLO)

    completion = await answer(provider, request, mode=mode)

    assert completion.text == TWENTY_TOKENS
    assert completion.usage.is_estimated is True
    assert completion.usage.completion_tokens == estimate_tokens(TWENTY_TOKENS)
    assert completion.usage.prompt_tokens == estimate_prompt_tokens(HELLO)


FAULTS = [
    ("429", RateLimited, True),
    ("500", Unavailable, True),
    ("503", Unavailable, True),
    ("hang", Timeout, True),
    ("context_length", ContextTooLong, False),
    ("400", BadRequest, False),
    ("401", BadRequest, True),
]


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
@pytest.mark.parametrize(("fault", "error_class", "is_retryable"), FAULTS, ids=[f"{f[0]}_case" for f in FAULTS])
async def test_each_fault_maps_to_its_typed_error(make_provider, mock_llm, fault, error_class, is_retryable, mode):
    mock_llm.configure(fault=fault, retry_after=7, hang_seconds=5)
    provider = make_provider(mock_llm.base_url, timeout=0.3)

    with pytest.raises(error_class) as caught:
        await answer(provider, ChatRequest(messages=HELLO), mode=mode)

    assert type(caught.value) is error_class
    assert caught.value.is_retryable is is_retryable
    if fault == "429":
        assert caught.value.retry_after == 7.0
        assert caught.value.headers == {"Retry-After": "7"}
    if fault == "401":
        assert caught.value.code == "provider_misconfigured"


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
async def test_connection_refused_is_unavailable(make_provider, refused_url, mode):
    provider = make_provider(f"{refused_url}/v1", timeout=2)

    with pytest.raises(Unavailable) as caught:
        await answer(provider, ChatRequest(messages=HELLO), mode=mode)

    assert caught.value.is_retryable is True


@pytest.mark.parametrize(
    ("fault", "error_class"), [("drop", Unavailable), ("stall", Timeout)], ids=["drop_case", "stall_case"]
)
async def test_mid_stream_failure_raises_after_the_tokens_already_sent(make_provider, mock_llm, fault, error_class):
    mock_llm.configure(fault=fault, fault_after=3, hang_seconds=5)
    provider = make_provider(mock_llm.base_url, timeout=0.3)
    received: list[str] = []

    with pytest.raises(error_class):
        await drain(provider.stream(ChatRequest(messages=HELLO)), into=received)

    assert "".join(received) == "The quick brown"


async def test_request_timeout_overrides_the_provider_default(make_provider, mock_llm):
    mock_llm.configure(ttft=0.5)
    provider = make_provider(mock_llm.base_url, timeout=5)

    with pytest.raises(Timeout):
        [event async for event in provider.stream(ChatRequest(messages=HELLO, timeout=0.1))]


async def test_fault_marker_in_a_message_applies_to_that_request_only(provider, mock_llm):
    with pytest.raises(Unavailable):
        await provider.complete(ChatRequest(messages=[{"role": "user", "content": "Hi [[mock fault=500]]"}]))

    completion = await provider.complete(ChatRequest(messages=HELLO))

    assert completion.usage.completion_tokens == 20
    assert mock_llm.count() == 2


async def test_request_model_is_used_when_the_target_names_none(make_provider, mock_llm):
    provider = make_provider(mock_llm.base_url, model=None)

    completion = await provider.complete(ChatRequest(messages=HELLO, model="other-model"))

    assert completion.usage.model == "other-model"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
    ids=["seconds_case", "milliseconds_case", "garbage_case", "absent_case"],
)
def test_retry_after_parsing(headers, expected):
    assert retry_after_seconds(headers) == expected


# --- how the lean client reads the stream's bytes ---------------------------------------------


def _sse_chunk(**fields) -> bytes:
    return b"data: " + json.dumps({"model": "raw-model", **fields}).encode() + b"\n\n"


def _token(text: str) -> bytes:
    return _sse_chunk(choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])


_STOP = _sse_chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])


@pytest.fixture
async def raw_server():
    """A server that sends a stream's bytes in the pieces a test chooses, each a read of its own."""
    pieces: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0.02)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    provider = openai_compat_provider(client="aiohttp", base_url=f"http://127.0.0.1:{port}/v1", model="raw-model")
    yield pieces, provider
    await provider.aclose()
    await runner.cleanup()


async def test_lines_split_across_reads_are_joined(raw_server):
    pieces, provider = raw_server
    stream = _token("Hello") + _token(" world") + _STOP + b"data: [DONE]\n\n"
    pieces += [stream[:9], stream[9:40], stream[40:41], stream[41:]]  # cut inside lines and prefixes

    events = [event async for event in provider.stream(ChatRequest(messages=HELLO))]

    assert "".join(event.text for event in events if isinstance(event, Delta)) == "Hello world"
    assert events[-1].finish_reason == "stop"
    assert events[-1].model == "raw-model"


async def test_crlf_lines_and_a_last_line_without_its_newline(raw_server):
    pieces, provider = raw_server
    pieces += [_token("Hi").replace(b"\n", b"\r\n"), _STOP.rstrip(b"\n")]  # the body ends mid-line

    events = [event async for event in provider.stream(ChatRequest(messages=HELLO))]

    assert [event.text for event in events if isinstance(event, Delta)] == ["Hi"]
    assert events[-1].finish_reason == "stop"


async def test_a_line_beyond_the_limit_is_a_malformed_stream(raw_server, monkeypatch):
    monkeypatch.setattr(openai_compat, "_MAX_SSE_LINE_BYTES", 1000)
    pieces, provider = raw_server
    pieces += [_token("fine"), b"data: " + b"x" * 600, b"x" * 600]

    received: list[str] = []
    with pytest.raises(Unavailable, match="malformed stream: a line longer than 1000 bytes"):
        await drain(provider.stream(ChatRequest(messages=HELLO)), into=received)
    assert received == ["fine"]


async def test_a_stream_cut_before_its_end_is_unavailable(raw_server):
    pieces, provider = raw_server
    pieces += [_token("Half"), _token(" an answer")]  # neither a finish reason nor [DONE]

    received: list[str] = []
    with pytest.raises(Unavailable, match="ended the stream before the answer was finished"):
        await drain(provider.stream(ChatRequest(messages=HELLO)), into=received)
    assert "".join(received) == "Half an answer"
