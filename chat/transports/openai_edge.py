"""``POST /v1/chat/completions`` served at the ASGI edge, in front of Django.

The busiest endpoint skips Django's middleware, DRF and thread hops (~20 ms of CPU a request when
it went through them): this module reads the body, resolves the API key's caller
(chat.callers.api_key_caller: process memory for a key seen before, else one Redis round trip),
calls the one door into a turn (chat.turn_core.turn_begin) like every other transport, and
renders the turn's events as OpenAI's chunks or completion. The Django view
(chat.transports.openai_api) serves the same endpoint for other credentials (JWT, OAuth2, a
session) and when ``PARLEY_OPENAI_EDGE=False``: same door, same renderers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from django.conf import settings

from chat import turns
from chat.callers import api_key_caller
from chat.metrics import EDGE_REQUESTS, EDGE_SECONDS
from chat.streams import STARTED_EVENT, generation_stream_key
from chat.transports.hub import follow_batches, get_hub
from chat.transports.openai_api import DONE_CHUNK, ChunkEncoder, completion_body, error_chunk
from chat.transports.sse import SSE_HEADERS
from chat.turn_core import Delivery, ExchangeTurn, turn_begin
from chat.turn_input import ChatCompletionInput
from tenants.errors import ParleyError, error_body, store_unavailable
from tenants.json_input import json_parse
from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis
from tenants.services import api_key_parse_prefix

logger = structlog.get_logger(__name__)

PATH = "/v1/chat/completions"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


# What a streamed answer ends with when the stream cannot be followed any more (Redis lost): an
# error chunk, which the OpenAI SDKs raise as an APIError, instead of a connection cut mid-body.
_STREAM_FAILED = error_chunk(
    message="The answer's stream was interrupted; please try again.", error_type="api_error", code="stream_interrupted"
)


class OpenAIEdge:
    """ASGI middleware: the chat completions endpoint here, everything else to ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        is_ours = (
            scope["type"] == "http"
            and scope["path"] == PATH
            and scope["method"] == "POST"
            and settings.PARLEY_OPENAI_EDGE
        )
        raw_key = _api_key_of(scope) if is_ours else None
        if raw_key is not None:
            await _serve(scope, receive, send, raw_key)
        else:  # other paths, and other credentials (JWT, OAuth2, a session): Django's
            await self.app(scope, receive, send)


def _api_key_of(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and api_key_parse_prefix(token) is not None:
                return token
            return None
    return None


async def _serve(scope: Scope, receive: Receive, send: Send, raw_key: str) -> None:
    started = time.perf_counter()
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    structlog.contextvars.clear_contextvars()
    status = 500
    response_started = False

    async def tracked_send(message: dict) -> None:
        nonlocal response_started
        response_started = response_started or message["type"] == "http.response.start"
        await send(message)

    try:
        status = await _complete(scope, headers, raw_key, receive, tracked_send)
    except Exception as error:
        if response_started:  # mid-stream: the status is sent; the stream ends with an error chunk
            logger.exception("edge_stream_failed", path=PATH)
            status = 200
            with contextlib.suppress(Exception):  # the client may be gone too
                await send({"type": "http.response.body", "body": _STREAM_FAILED, "more_body": False})
        elif isinstance(error, ParleyError):
            status = await _send_error(send, error)
        elif isinstance(error, REDIS_UNAVAILABLE):
            logger.warning("store_unavailable", path=PATH, exc_info=True)
            status = await _send_error(send, store_unavailable())
        else:
            logger.exception("edge_request_failed", path=PATH)
            await _send_json(
                send,
                500,
                error_body(message="Internal server error.", error_type="api_error", code="internal_error"),
                {},
            )
    finally:
        EDGE_REQUESTS.labels(str(status)).inc()
        logger.info(
            "request_finished",
            request=f"POST {PATH}",
            code=status,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )


async def _send_error(send: Send, error: ParleyError) -> int:
    headers = dict(error.headers)
    if error.status_code == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
    body = error_body(message=error.message, error_type=error.error_type, code=error.code, param=error.param)
    await _send_json(send, error.status_code, body, headers)
    return error.status_code


async def _complete(scope: Scope, headers: dict[str, str], raw_key: str, receive: Receive, send: Send) -> int:
    started = time.perf_counter()
    body = await _read_body(receive, headers)
    redis = get_loop_redis()
    client_ip = (scope.get("client") or ("", 0))[0] or ""
    caller = await api_key_caller(raw_key, host=headers.get("host", ""), client_ip=client_ip, redis=redis)
    data = json_parse(body)
    # The turn's stream is followed through this process's inbox: registered before its job is
    # queued, it costs no channel subscription (chat.transports.hub).
    hub = get_hub()
    delivery = Delivery(inbox=await hub.inbox_channel())
    subscription = hub.register(generation_stream_key(caller.tenant.schema_name, delivery.generation_id))
    try:
        turn = await turn_begin(caller, ExchangeTurn(body=data), delivery=delivery, redis=redis)
        structlog.contextvars.bind_contextvars(tenant=turn.caller.tenant.slug)
        # This process wrote the stream's first entry: the worker's events that follow it come
        # inside the inbox's notifications, with no read of the stream.
        hub.advance(subscription, turn.created_event_id)
        completion_id = f"chatcmpl-{turn.generation_id.replace('-', '')}"
        created = int(time.time())
        response_headers = {"X-Parley-Generation-Id": turn.generation_id, **turn.headers}
        if turn.cache_layer is not None:  # answered at once: nothing will notify
            response_headers["X-Parley-Cache"] = turn.cache_layer
            if turn.events:
                hub.hand_over(subscription, turn.events)  # the events this process wrote
            else:
                hub.mark(turn.stream_key)  # read them now
        request = turn.input
        assert isinstance(request, ChatCompletionInput)
        if request.is_streamed:
            await _stream(
                send, subscription, request, completion_id, created, turn.bot.public_id, response_headers, started
            )
            return 200
        return await _answer(send, subscription, completion_id, created, turn.bot, response_headers, started)
    finally:
        await hub.unsubscribe(subscription)


async def _stream(
    send, subscription, request: ChatCompletionInput, completion_id, created, model, headers, started
) -> None:
    """The chunks, after the worker's cache decision (for ``X-Parley-Cache``), from one
    subscription to the generation's stream. Each batch of events that arrived together is one
    write: the opening chunk goes out with the first token, the last tokens with the end."""
    encoder = ChunkEncoder(
        completion_id=completion_id,
        created=created,
        model=model,
        include_usage=request.include_usage,
    )
    batches = follow_batches(subscription.key, block_ms=turns.CACHE_HEADER_WAIT_MS, subscription=subscription)
    async with contextlib.aclosing(batches):
        layer, held, is_ended = headers.get("X-Parley-Cache"), [], False
        if layer is None:
            async for batch in batches:
                if batch is None:
                    break  # no decision within the wait: start without the header
                held += batch
                decision = next((event for event in batch if event.type == STARTED_EVENT), None)
                is_ended = batch[-1].is_terminal
                if decision is not None or is_ended:
                    layer = decision.data.get("cache") if decision is not None else None
                    break
        if layer is not None:
            headers["X-Parley-Cache"] = layer
        await send({"type": "http.response.start", "status": 200, "headers": _encode({**SSE_HEADERS, **headers})})
        EDGE_SECONDS.observe(time.perf_counter() - started)
        chunks = [encoder.encode(event) for event in held]
        body = encoder.opening() + b"".join(chunks)
        if not is_ended and any(chunks):  # the first token came with the decision
            await send({"type": "http.response.body", "body": body, "more_body": True})
            body = b""
        if not is_ended:
            async for batch in batches:
                body += encoder.encode(None) if batch is None else b"".join(map(encoder.encode, batch))
                if batch is not None and batch[-1].is_terminal:
                    break
                await send({"type": "http.response.body", "body": body, "more_body": True})
                body = b""
        await send({"type": "http.response.body", "body": body + DONE_CHUNK, "more_body": False})


async def _answer(send, subscription, completion_id, created, bot, headers, started) -> int:
    parts: list[str] = []
    done: dict = {}
    async for batch in follow_batches(subscription.key, block_ms=600_000, subscription=subscription):
        if batch is None:
            raise ParleyError("The answer took too long.", code="generation_timeout", status_code=504)
        for event in batch:
            if event.type == "token":
                parts.append(event.data["text"])
            elif event.type == "done":
                done = event.data
            elif event.type == "error":
                raise turns.generation_error(event.data)
    body = completion_body(
        completion_id=completion_id,
        created=created,
        model=bot.public_id,
        version=bot.version,
        text="".join(parts),
        done=done,
    )
    await _send_json(send, 200, body, {**headers, "X-Parley-Cache": done.get("cache_layer") or "miss"})
    EDGE_SECONDS.observe(time.perf_counter() - started)
    return 200


# --- request ------------------------------------------------------------------------------------


async def _read_body(receive: Receive, headers: dict[str, str]) -> bytes:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE or math.inf
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ParleyError("Request body is too large.", code="request_too_large", status_code=413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ParleyError("The client went away.", code="client_disconnected", status_code=400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ParleyError("Request body is too large.", code="request_too_large", status_code=413)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


# --- response -----------------------------------------------------------------------------------


def _encode(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in headers.items()]


async def _send_json(send: Send, status: int, body: dict, headers: dict[str, str]) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": _encode({"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}),
        }
    )
    await send({"type": "http.response.body", "body": payload})
