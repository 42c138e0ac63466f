"""A mock OpenAI-compatible model server (with vLLM's /metrics and /health) for tests and benchmarks.

Run on its own::

    python -m chat.mock_server --port 9100 [--ttft-ms 50 --tokens-per-second 40 --answer-tokens 20]
    python -m chat.mock_server --port 9100 --fault 429 --fault-count 5     # fail five requests, then answer

Endpoints: ``POST /v1/chat/completions`` (SSE when ``stream``; usage in a last chunk when
``stream_options.include_usage``), ``POST /v1/embeddings`` (deterministic unit vectors seeded by a
hash of the text; the status faults and ``embedding_latency`` apply), ``POST /v1/rerank`` (Cohere's
shape, scored by word overlap; faults and ``rerank_latency`` apply), ``GET /v1/models``,
``GET /metrics`` (vLLM gauge names), ``GET /health``.

Knobs (``MockConfig``) are set at start (flags), per request, and at run time:

* per request, with headers ``X-Mock-Fault``, ``X-Mock-Fault-After``, ``X-Mock-Tokens``,
  ``X-Mock-TTFT-Ms``, ``X-Mock-Tokens-Per-Second`` — or, where a caller cannot add headers
  (a request relayed through Parley), with a marker anywhere in a message:
  ``[[mock fault=drop fault_after=2 tokens=5 ttft_ms=10 tokens_per_second=50]]``;
* at run time, ``POST /_mock/config`` with a JSON object of ``MockConfig`` fields;
  ``POST /_mock/reset`` restores the start configuration and zeroes the counters, which
  ``GET /_mock/stats`` reports.

Faults: ``429`` (with Retry-After), ``500``, ``503``, ``400``, ``401``, ``context_length`` (vLLM's
400), ``hang`` (no response at all), ``drop`` (connection closed after ``fault_after`` tokens),
``stall`` (stream stops after ``fault_after`` tokens and never ends).

It imports nothing from Django, so benchmarks can run it as a separate process. At zero delay a
whole streamed answer goes out in one write; with pacing, one write per token.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from aiohttp import web

FAULTS = ("none", "429", "500", "503", "400", "401", "context_length", "hang", "drop", "stall")
ANSWER_TEXT = (
    "The quick brown fox jumps over the lazy dog while a mock model streams tokens at a steady "
    "pace so that every test and benchmark sees the same answer"
)
VOCABULARY = tuple(ANSWER_TEXT.split())
_TOKEN_JSON = [json.dumps(word) for word in VOCABULARY]
_TOKEN_JSON_SPACED = [json.dumps(" " + word) for word in VOCABULARY]
_MARKER = re.compile(r"\[\[mock\b([^\]]*)\]\]")
_PROMPT_PIECE = re.compile(r"\w+|[^\w\s]")
_HEADER_OVERRIDES = {
    "X-Mock-Fault": "fault",
    "X-Mock-Fault-After": "fault_after",
    "X-Mock-Tokens": "tokens",
    "X-Mock-TTFT-Ms": "ttft_ms",
    "X-Mock-Tokens-Per-Second": "tokens_per_second",
}


@dataclass(frozen=True)
class MockConfig:
    model: str = "mock-model"
    ttft: float = 0.0  # seconds before the first token (and before a non-streamed answer)
    tokens_per_second: float = 0.0  # 0: all tokens at once
    answer_tokens: int = 20
    fault: str = "none"
    fault_after: int = 3  # tokens sent before a drop or a stall
    fault_count: int | None = None  # fault only this many more requests, then answer normally; None: all
    retry_after: float = 1.0  # seconds, in 429 answers
    hang_seconds: float = 300.0  # how long a hang or stall lasts
    embedding_dimensions: int = 384
    embedding_latency: float = 0.0  # seconds before each embeddings answer
    rerank_latency: float = 0.0  # seconds before each rerank answer
    is_healthy: bool = True  # GET /health answers 503 when false
    is_usage_reported: bool = True  # false: no usage at all, like servers that ignore stream_options
    # vLLM gauges on /metrics; None derives them from the requests in flight.
    kv_cache_usage: float | None = None
    num_requests_running: int | None = None
    num_requests_waiting: int | None = None
    kv_metric_name: str = "vllm:kv_cache_usage_perc"  # vLLM < 0.10 calls it vllm:gpu_cache_usage_perc

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {', '.join(FAULTS)}, not {self.fault!r}")
        if self.answer_tokens < 0 or self.fault_after < 0 or self.embedding_dimensions < 1:
            raise ValueError("answer_tokens and fault_after must be ≥ 0, embedding_dimensions ≥ 1")
        if self.ttft < 0 or self.tokens_per_second < 0:
            raise ValueError("ttft and tokens_per_second must be ≥ 0")


class MockState:
    """Configuration and counters of one server. Safe to change from another thread."""

    def __init__(self, config: MockConfig) -> None:
        self.start_config = config
        self.config = config
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self._lock = threading.Lock()

    def configure(self, **changes: Any) -> MockConfig:
        unknown = set(changes) - {field.name for field in dataclasses.fields(MockConfig)}
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        with self._lock:
            self.config = dataclasses.replace(self.config, **changes)
        return self.config

    def reset(self) -> None:
        with self._lock:
            self.config = self.start_config
            self.counts.clear()

    def take_fault(self) -> str:
        """The configured fault for this request, counting down ``fault_count``."""
        with self._lock:
            config = self.config
            if config.fault == "none" or config.fault_count is None:
                return config.fault
            if config.fault_count <= 0:
                self.config = dataclasses.replace(config, fault="none", fault_count=None)
                return "none"
            self.config = dataclasses.replace(config, fault_count=config.fault_count - 1)
            return config.fault

    def stats(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "in_flight": self.in_flight}


def _error(status: int, message: str, *, error_type: str, code: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


def _overrides(request: web.Request, messages: list[Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and "[[mock" in content:
            for marker in _MARKER.findall(content):
                for pair in re.split(r"[\s,]+", marker.strip()):
                    name, _, value = pair.partition("=")
                    if name and value:
                        found[name] = value
    for header, name in _HEADER_OVERRIDES.items():
        if header in request.headers:
            found[name] = request.headers[header]
    return found


def _prompt_tokens(messages: list[Any]) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        count += 4 + (len(_PROMPT_PIECE.findall(content)) if isinstance(content, str) else 0)
    return count


@lru_cache(maxsize=64)
def _answer_text(tokens: int) -> str:
    return " ".join(VOCABULARY[index % len(VOCABULARY)] for index in range(tokens))


class MockServer:
    """The aiohttp application of one mock server."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self._ids = itertools.count(1)
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/embeddings", self.embeddings),
                web.post("/v1/rerank", self.rerank),
                web.get("/v1/models", self.models),
                web.get("/metrics", self.metrics),
                web.get("/health", self.health),
                web.get("/_mock/config", self.config_get),
                web.post("/_mock/config", self.config_set),
                web.post("/_mock/reset", self.reset),
                web.get("/_mock/stats", self.stats),
            ]
        )

    # -- OpenAI API -----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        state.counts["chat_completions"] += 1
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not valid JSON.", error_type="invalid_request_error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages must be a non-empty list.", error_type="invalid_request_error")
        config = state.config
        overrides = _overrides(request, messages)
        try:
            fault = overrides["fault"] if "fault" in overrides else state.take_fault()
            answer_tokens = int(overrides.get("tokens", config.answer_tokens))
            fault_after = int(overrides.get("fault_after", config.fault_after))
            ttft = float(overrides["ttft_ms"]) / 1000 if "ttft_ms" in overrides else config.ttft
            tokens_per_second = float(overrides.get("tokens_per_second", config.tokens_per_second))
        except ValueError as error:
            return _error(400, f"Bad mock override: {error}", error_type="invalid_request_error")

        early = await self._early_fault(request, fault, config, messages)
        if early is not None:
            return early

        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = min(answer_tokens, max_tokens) if isinstance(max_tokens, int) else answer_tokens
        finish_reason = "length" if tokens < answer_tokens else "stop"
        model = config.model if body.get("model") in (None, "") else str(body["model"])
        usage = {"prompt_tokens": _prompt_tokens(messages), "completion_tokens": tokens}
        usage["total_tokens"] = usage["prompt_tokens"] + tokens
        state.in_flight += 1
        try:
            if ttft:
                await asyncio.sleep(ttft)
            if body.get("stream"):
                include_usage = config.is_usage_reported and bool(
                    (body.get("stream_options") or {}).get("include_usage")
                )
                return await self._stream(
                    request,
                    model=model,
                    tokens=tokens,
                    finish_reason=finish_reason,
                    usage=usage if include_usage else None,
                    fault=fault,
                    fault_after=fault_after,
                    tokens_per_second=tokens_per_second,
                    hang_seconds=config.hang_seconds,
                )
            if fault in ("drop", "stall"):
                if fault == "stall":
                    await asyncio.sleep(config.hang_seconds)
                _drop(request)
                return web.Response()
            if tokens_per_second:
                await asyncio.sleep(tokens / tokens_per_second)
            return web.json_response(
                {
                    "id": f"chatcmpl-mock-{next(self._ids)}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": _answer_text(tokens)},
                            "finish_reason": finish_reason,
                            "logprobs": None,
                        }
                    ],
                    **({"usage": usage} if config.is_usage_reported else {}),
                }
            )
        finally:
            state.in_flight -= 1

    async def _fault_then_wait(self, request: web.Request, latency: float) -> web.StreamResponse | None:
        """For a non-chat endpoint: the next configured fault's response (if it answers early),
        else the endpoint's latency, then None."""
        fault = self.state.take_fault()
        if fault != "none":
            early = await self._early_fault(request, fault, self.state.config, [])
            if early is not None:
                return early
        if latency:
            await asyncio.sleep(latency)
        return None

    async def _early_fault(
        self, request: web.Request, fault: str, config: MockConfig, messages: list[Any]
    ) -> web.StreamResponse | None:
        if fault == "429":
            return _error(
                429,
                "Rate limit reached for requests.",
                error_type="rate_limit_error",
                code="rate_limit_exceeded",
                **{"Retry-After": f"{config.retry_after:g}"},
            )
        if fault in ("500", "503"):
            return _error(int(fault), "The mock server had an error.", error_type="server_error")
        if fault == "400":
            return _error(400, "The mock server rejected the request.", error_type="invalid_request_error")
        if fault == "401":
            return _error(
                401, "Incorrect API key provided.", error_type="invalid_request_error", code="invalid_api_key"
            )
        if fault == "context_length":
            return _error(
                400,
                "This model's maximum context length is 4096 tokens. However, you requested "
                f"{_prompt_tokens(messages) + 8192} tokens. Please reduce the length of the messages.",
                error_type="BadRequestError",
            )
        if fault == "hang":
            await asyncio.sleep(config.hang_seconds)
            _drop(request)
            return web.Response()
        return None

    async def _stream(
        self,
        request: web.Request,
        *,
        model: str,
        tokens: int,
        finish_reason: str,
        usage: dict[str, int] | None,
        fault: str,
        fault_after: int,
        tokens_per_second: float,
        hang_seconds: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        completion_id = f"chatcmpl-mock-{next(self._ids)}"
        head = (
            f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{int(time.time())},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,"delta":'
        )
        pending = [head, '{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n']
        interval = 1 / tokens_per_second if tokens_per_second else 0.0
        cut_at = fault_after if fault in ("drop", "stall") else None
        for index in range(tokens):
            if index == cut_at:
                break
            token = (_TOKEN_JSON_SPACED if index else _TOKEN_JSON)[index % len(VOCABULARY)]
            pending.append(f'{head}{{"content":{token}}},"logprobs":null,"finish_reason":null}}]}}\n\n')
            if interval:
                await response.write("".join(pending).encode())
                pending.clear()
                await asyncio.sleep(interval)
        if cut_at is not None and cut_at <= tokens:
            if pending:
                await response.write("".join(pending).encode())
            if fault == "stall":
                await asyncio.sleep(hang_seconds)
            _drop(request)
            return response
        pending.append(f'{head}{{}},"logprobs":null,"finish_reason":"{finish_reason}"}}]}}\n\n')
        if usage is not None:
            pending.append(
                f'data: {{"id":"{completion_id}","object":"chat.completion.chunk","created":{int(time.time())},'
                f'"model":{json.dumps(model)},"choices":[],"usage":{json.dumps(usage)}}}\n\n'
            )
        pending.append("data: [DONE]\n\n")
        await response.write("".join(pending).encode())
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.state.counts["embeddings"] += 1
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not valid JSON.", error_type="invalid_request_error")
        texts = body.get("input") if isinstance(body, dict) else None
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            return _error(
                400, "input must be a string or a non-empty list of strings.", error_type="invalid_request_error"
            )
        config = self.state.config
        early = await self._fault_then_wait(request, config.embedding_latency)
        if early is not None:
            return early
        dimensions = int(body.get("dimensions") or config.embedding_dimensions)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embedding_vector(text, dimensions)
            embedding: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        prompt_tokens = sum(len(_PROMPT_PIECE.findall(text)) for text in texts)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body.get("model") or config.model,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            }
        )

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        """Cohere/Jina-shaped reranking (``documents``; TEI's ``texts`` too): each passage scored by the
        share of the query's words it contains, so tests can predict the order."""
        self.state.counts["rerank"] += 1
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "The body is not valid JSON.", error_type="invalid_request_error")
        query = body.get("query") if isinstance(body, dict) else None
        texts = (body.get("documents") or body.get("texts")) if isinstance(body, dict) else None
        if not isinstance(query, str) or not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return _error(
                400, "query must be a string and documents a list of strings.", error_type="invalid_request_error"
            )
        config = self.state.config
        early = await self._fault_then_wait(request, config.rerank_latency)
        if early is not None:
            return early
        words = set(_PROMPT_PIECE.findall(query.lower()))
        scores = [len(words & set(_PROMPT_PIECE.findall(text.lower()))) / max(1, len(words)) for text in texts]
        order = sorted(range(len(texts)), key=lambda index: (-scores[index], index))[: body.get("top_n") or len(texts)]
        results = [{"index": index, "relevance_score": round(scores[index], 6)} for index in order]
        return web.json_response({"model": body.get("model") or config.model, "results": results})

    async def models(self, request: web.Request) -> web.Response:
        self.state.counts["models"] += 1
        model = self.state.config.model
        return web.json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "parley-mock"}]}
        )

    # -- vLLM operations ------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        state = self.state
        state.counts["metrics"] += 1
        config = state.config
        running = config.num_requests_running if config.num_requests_running is not None else state.in_flight
        waiting = config.num_requests_waiting if config.num_requests_waiting is not None else 0
        kv_usage = config.kv_cache_usage if config.kv_cache_usage is not None else min(1.0, state.in_flight * 0.02)
        labels = f'engine="0",model_name="{config.model}"'
        lines = []
        for name, help_text, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            (config.kv_metric_name, "KV-cache usage. 1 means 100 percent usage.", kv_usage),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{{{labels}}} {float(value)}"]
        lines += [
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(state.counts['chat_completions'] * 10)}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")

    async def health(self, request: web.Request) -> web.Response:
        self.state.counts["health"] += 1
        return web.Response(status=200 if self.state.config.is_healthy else 503)

    # -- Control --------------------------------------------------------------------------------

    async def config_get(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self.state.config))

    async def config_set(self, request: web.Request) -> web.Response:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            config = self.state.configure(**changes)
        except (ValueError, TypeError) as error:
            return _error(400, str(error), error_type="invalid_request_error")
        return web.json_response(dataclasses.asdict(config))

    async def reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return web.json_response(dataclasses.asdict(self.state.config))

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())


def _drop(request: web.Request) -> None:
    """Close the connection without finishing the response, as a crashed server would."""
    if request.transport is not None:
        request.transport.close()


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text``: equal texts embed equally, different ones almost orthogonally."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = struct.unpack(f"<{dimensions}h", raw)
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


# ---------------------------------------------------------------------------------------------
# Running it


@dataclass
class MockServerHandle:
    """A running mock server: its address, and direct access to its knobs and counters."""

    state: MockState
    url: str

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"{self.url}/v1"

    def configure(self, **changes: Any) -> MockConfig:
        return self.state.configure(**changes)

    def reset(self) -> None:
        self.state.reset()

    def count(self, name: str = "chat_completions") -> int:
        return self.state.counts[name]


def _runner(state: MockState) -> web.AppRunner:
    # handler_cancellation: a client that gives up on a hang or stall frees its handler.
    return web.AppRunner(MockServer(state).app, access_log=None, handler_cancellation=True)


@contextmanager
def mock_servers_in_thread(count: int = 1, config: MockConfig | None = None) -> Iterator[list[MockServerHandle]]:
    """Start ``count`` mock servers on free loopback ports, served by one background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="mock-llm-server", daemon=True)
    thread.start()
    runners: list[web.AppRunner] = []

    async def start() -> list[MockServerHandle]:
        handles = []
        for _ in range(count):
            state = MockState(config or MockConfig())
            runner = _runner(state)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0, shutdown_timeout=0.5)
            await site.start()
            host, port = runner.addresses[0][:2]
            handles.append(MockServerHandle(state=state, url=f"http://{host}:{port}"))
        return handles

    async def stop() -> None:
        for runner in runners:
            await runner.cleanup()

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    finally:
        with suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _serve(host: str, port: int, config: MockConfig, reuse_port: bool) -> None:
    app = MockServer(MockState(config)).app
    web.run_app(
        app, host=host, port=port, access_log=None, handler_cancellation=True, reuse_port=reuse_port, print=None
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chat.mock_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--model", default=MockConfig.model)
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--tokens-per-second", type=float, default=0.0, help="0: no pacing")
    parser.add_argument("--answer-tokens", type=int, default=MockConfig.answer_tokens)
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--fault-after", type=int, default=MockConfig.fault_after)
    parser.add_argument("--fault-count", type=int, default=None)
    parser.add_argument("--retry-after", type=float, default=MockConfig.retry_after)
    parser.add_argument("--hang-seconds", type=float, default=MockConfig.hang_seconds)
    parser.add_argument("--embedding-dimensions", type=int, default=MockConfig.embedding_dimensions)
    arguments = parser.parse_args(argv)
    config = MockConfig(
        model=arguments.model,
        ttft=arguments.ttft_ms / 1000,
        tokens_per_second=arguments.tokens_per_second,
        answer_tokens=arguments.answer_tokens,
        fault=arguments.fault,
        fault_after=arguments.fault_after,
        fault_count=arguments.fault_count,
        retry_after=arguments.retry_after,
        hang_seconds=arguments.hang_seconds,
        embedding_dimensions=arguments.embedding_dimensions,
    )
    print(f"mock model server on http://{arguments.host}:{arguments.port} ({arguments.workers} worker(s))", flush=True)
    if arguments.workers <= 1:
        _serve(arguments.host, arguments.port, config, reuse_port=False)
        return
    # Each worker has its own knobs and counters: /_mock/config reaches only the one that answers.
    children: list[int] = []

    def stop_children(signal_number: int, _frame: object) -> None:
        for child in children:
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    for _ in range(arguments.workers):
        pid = os.fork()
        if pid == 0:
            _serve(arguments.host, arguments.port, config, reuse_port=True)
            os._exit(0)
        children.append(pid)
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    for pid in children:
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
