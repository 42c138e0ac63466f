"""``POST /v1/chat/completions`` served at the ASGI edge, in front of Django.

The busiest endpoint does no SQL and never leaves the event loop on its hot path: the tenant and
the API key come from the resolution cache and the configuration epoch in one Redis round trip
(tenants.resolution), the bot and the billing policy from per-epoch process memory
(chat.snapshots, billing.budgets), the gateway runs its Redis scripts on the loop's client, and
the turn — the conversation's row included — is queued in one Redis transaction for the
generation workers and the batch writer (chat.turns). Through Django, the same request paid
~20 ms of CPU in middleware, DRF and thread hops (tests/perf/RESULTS.md).

Semantics are the Django view's (chat.transports.openai_api, still mounted for the test client
and the OpenAPI schema): the same validation — a well-formed request is checked here, anything
else by the view's own serializer, so error messages match — the same errors in OpenAI's shape,
the same gateway, the same events. ``PARLEY_OPENAI_EDGE=False`` sends everything to Django.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings

from chat import gateway, response_cache, turns
from chat.gateway import Admission, AdmissionGate, Caller
from chat.metrics import EDGE_REQUESTS, EDGE_SECONDS
from chat.selectors import EndUser
from chat.snapshots import bot_snapshot_get
from chat.streams import STARTED_EVENT, generation_stream_key
from chat.transports.hub import Subscription, follow_batches, get_hub
from chat.transports.openai_api import (
    DONE_CHUNK,
    MAX_MESSAGES,
    ROLES,
    ChatCompletionInputSerializer,
    ChunkEncoder,
    completion_body,
    error_chunk,
    generation_overrides,
)
from chat.transports.sse import SSE_HEADERS
from tenants.authentication import (
    api_key_authenticate_async,
    api_key_confirm_queue,
    api_key_confirmed,
    api_key_known,
    api_key_unchanged_condition,
)
from tenants.errors import (
    NotFound,
    ParleyError,
    PermissionDeniedError,
    ValidationFailed,
    error_body,
    flatten_validation,
)
from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis
from tenants.services import api_key_parse_prefix

logger = structlog.get_logger(__name__)

PATH = "/v1/chat/completions"
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed")
_KNOWN_FIELDS = frozenset(ChatCompletionInputSerializer().fields)


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
    host = headers.get("host", "")
    # The turn's stream is followed through this process's inbox: registered before its job is
    # queued, it costs no channel subscription (chat.transports.hub).
    hub = get_hub()
    inbox = await hub.inbox_channel()
    generation_id = str(uuid.uuid4())
    begun = await _begin_known(raw_key, host, client_ip, body, redis, hub, inbox, generation_id)
    if begun is None:
        request = await _admit(raw_key, host, client_ip, body, redis)
        begun = _Begun(request, hub.register(generation_stream_key(request.tenant.schema_name, generation_id)))
    admitted, subscription = begun.request, begun.subscription
    data, bot = admitted.data, admitted.bot
    structlog.contextvars.bind_contextvars(tenant=admitted.tenant.slug)
    try:
        turn = begun.turn or await turns.turn_start_from_messages_async(
            **admitted.turn_fields(),
            admission=admitted.admission,
            redis=redis,
            generation_id=generation_id,
            inbox=inbox,
        )
        # This process wrote the stream's first entry: the worker's events that follow it come
        # inside the inbox's notifications, with no read of the stream.
        hub.advance(subscription, turn.created_event_id)
        completion_id = f"chatcmpl-{generation_id.replace('-', '')}"
        created = int(time.time())
        response_headers = {"X-Parley-Generation-Id": generation_id, **turn.headers}
        if turn.cache_layer is not None:  # answered at once: nothing will notify
            response_headers["X-Parley-Cache"] = turn.cache_layer
            if turn.events:
                hub.hand_over(subscription, turn.events)  # the events this process wrote
            else:
                hub.mark(turn.stream_key)  # read them now
        if data["stream"]:
            await _stream(send, subscription, data, completion_id, created, bot.public_id, response_headers, started)
            return 200
        return await _answer(send, subscription, completion_id, created, bot, response_headers, started)
    finally:
        await hub.unsubscribe(subscription)


@dataclass(slots=True)
class _Request:
    """A request the edge has authenticated and read, up to its admission by the gateway."""

    tenant: Any
    epoch: bytes
    data: dict
    bot: Any  # chat.snapshots.BotSnapshot
    overrides: dict
    end_user: EndUser
    caller: Caller
    admission: Admission | None = None

    def estimate(self) -> dict:
        return turns.admission_estimate(bot=self.bot, messages=self.data["messages"], overrides=self.overrides)

    def turn_fields(self) -> dict:
        """What the turn is made of (``turns.turn_start_from_messages_async``, ``edge_turn_prepare``)."""
        return {
            "bot": self.bot,
            "end_user": self.end_user,
            "messages": self.data["messages"],
            "overrides": self.overrides,
            "is_streamed": self.data["stream"],
            "epoch": self.epoch,
        }


async def _admit(raw_key: str, host: str, client_ip: str, body: bytes, redis) -> _Request:
    """Authenticate (one round trip), read the request, then the gateway (another)."""
    tenant, epoch, context = await api_key_authenticate_async(raw_key, host=host, client_ip=client_ip, redis=redis)
    request = await _read_request(tenant, epoch, context, body)
    request.admission = await gateway.admit_async(caller=request.caller, epoch=epoch, **request.estimate())
    return request


@dataclass(slots=True)
class _Begun:
    """An admitted request, the subscription to its generation's stream, and its turn when it was
    queued in the admission's round trip (``_begin_known``)."""

    request: _Request
    subscription: Subscription
    turn: turns.AsyncStartedTurn | None = None


async def _begin_known(
    raw_key: str, host: str, client_ip: str, body: bytes, redis, hub, inbox: str, generation_id: str
) -> _Begun | None:
    """``_admit`` and the turn's start in one round trip, for a key this process accepted before:
    checked here against what it knows (tenants.authentication.api_key_known), confirmed
    unchanged and admitted in the round trip that queues the turn, behind chat.gateway's
    AdmissionGate. A turn that may be answered from the response cache (its exact entry read in
    the admission's round trip), or whose gate did not hold, is queued in a round trip of its own
    once admitted. None — after giving back what the admission took — when anything about the key
    differs, or the request has a fault whose error the full path words: the caller then takes
    that path."""
    known = api_key_known(raw_key, host=host)
    if known is None:
        return None
    try:
        request = await _read_request(known.tenant, known.epoch, known.context, body)
    except ParleyError:
        return None
    queued = await gateway.admission_prepare(caller=request.caller, epoch=request.epoch, **request.estimate())
    gate = None if turns.edge_is_cacheable(request.bot, request.overrides) else AdmissionGate.of(queued)
    subscription = hub.register(generation_stream_key(request.tenant.schema_name, generation_id))
    try:
        begun = await _admit_known(known, request, queued, gate, client_ip, redis, inbox, generation_id)
    except BaseException:
        await hub.unsubscribe(subscription)
        raise
    if begun is None:
        await hub.unsubscribe(subscription)
        return None
    return _Begun(request, subscription, begun)


async def _admit_known(
    known, request: _Request, queued, gate: AdmissionGate | None, client_ip: str, redis, inbox: str, generation_id: str
) -> turns.AsyncStartedTurn | None:
    """The round trip of ``_begin_known``, and the turn's own when it needs one (a cacheable turn,
    whose exact cache entry is read in the admission's; a gate that did not hold): the started
    turn, or None when the key is to be checked the full way."""
    lookup = None
    try:
        async with redis.pipeline(transaction=False) as pipe:
            if gate is not None:
                gate.watch(pipe)
            confirmation = api_key_confirm_queue(pipe, known, client_ip=client_ip, peek=gate is None)
            queued.queue(pipe, marker=gate.marker if gate is not None else None)
            turn = turns.edge_turn_prepare(
                **request.turn_fields(), ticket=queued.ticket, generation_id=generation_id, inbox=inbox
            )
            if gate is not None:
                keys, values, absent = api_key_unchanged_condition(known, client_ip=client_ip)
                gate.check(pipe, queued, keys=keys, values=values, absent=absent)
                turn.queue(pipe, first=gate.begin(pipe))
                gate.commit(pipe)
            else:
                lookup = turn.exact_lookup(request.bot)
                lookup_index = len(pipe)
                if lookup is not None:
                    pipe.get(lookup[1])
            replies = await pipe.execute(raise_on_error=False)
    except REDIS_UNAVAILABLE:
        return None  # the full path has the rules for Redis being away
    committed = gate.committed(replies) if gate is not None else None
    is_confirmed = await api_key_confirmed(
        known, replies, confirmation, client_ip=client_ip, is_unthrottled=committed is not None
    )
    if committed is None and not is_confirmed:
        await queued.undo(replies)
        return None
    admission = request.admission = await queued.finish(replies)
    if committed is not None:
        return await turn.started(committed, headers=admission.headers, redis=redis)
    hit = None
    if lookup is not None and not isinstance(replies[lookup_index], Exception):
        hit = response_cache.exact_answer(lookup[0], replies[lookup_index])
    turn.job = dataclasses.replace(turn.job, gateway=admission.ticket)  # (a fallback may have re-reserved)
    return await turn.start(redis, hit=hit, headers=admission.headers)


async def _read_request(tenant, epoch: bytes, context, body: bytes) -> _Request:
    """The authenticated caller's request: scope, body, bot (per epoch), who asks."""
    if "chat" not in context.scopes and "admin" not in context.scopes:
        raise PermissionDeniedError(
            "This credential lacks the 'chat' scope needed for this operation.", code="insufficient_scope"
        )
    data = await _validated(body)
    bot = await bot_snapshot_get(schema_name=tenant.schema_name, epoch=epoch, public_id=data["model"])
    if bot is None:
        raise NotFound(
            f"The model {data['model']!r} does not exist: use a bot id from /v1/models.",
            param="model",
            code="model_not_found",
        )
    turns.validate_content(data["messages"][-1]["content"])
    external_user = data.get("user")
    end_user_id = f"key:{context.api_key_id}" + (f":{external_user}" if external_user else "")
    caller = Caller(
        tenant=tenant,
        bot_id=bot.pk,
        bot_public_id=bot.public_id,
        bot_rate_limits=bot.rate_limits,
        api_key_id=context.api_key_id,
        end_user=end_user_id,
        is_end_user_limited=bool(external_user),
    )
    return _Request(
        tenant=tenant,
        epoch=epoch,
        data=data,
        bot=bot,
        overrides=generation_overrides(data),
        end_user=EndUser(kind="api", id=end_user_id, sees_all="admin" in context.scopes),
        caller=caller,
    )


async def _stream(send, subscription, data, completion_id, created, model, headers, started) -> None:
    """The chunks, after the worker's cache decision (for ``X-Parley-Cache``), from one
    subscription to the generation's stream. Each batch of events that arrived together is one
    write: the opening chunk goes out with the first token, the last tokens with the end."""
    encoder = ChunkEncoder(
        completion_id=completion_id,
        created=created,
        model=model,
        include_usage=bool((data.get("stream_options") or {}).get("include_usage")),
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


async def _validated(body: bytes) -> dict:
    try:
        data = orjson.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("JSON parse error: the body is not valid JSON.", code="invalid_json") from None
    cleaned = _well_formed(data)
    if cleaned is not None:
        return cleaned
    return await sync_to_async(_serializer_validated, thread_sensitive=False)(data)


def _serializer_validated(data: Any) -> dict:
    """The view's serializer: its cleaned data, or its first error as the view would render it."""
    serializer = ChatCompletionInputSerializer(data=data)
    if not serializer.is_valid():
        message, param = flatten_validation(serializer.errors)
        raise ValidationFailed(message, param=param)
    return dict(serializer.validated_data)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _well_formed(data: Any) -> dict | None:
    """The request as the serializer would clean it, when it is plainly valid; None for anything
    the serializer must judge (and word the error for). Never accepts what the serializer refuses."""
    if not isinstance(data, dict) or not data.keys() <= _KNOWN_FIELDS:
        return None
    model, messages = data.get("model"), data.get("messages")
    if not isinstance(model, str) or not 0 < len(model) <= 100 or model != model.strip():
        return None
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        return None
    for message in messages:
        if (
            not isinstance(message, dict)
            or message.keys() - {"role", "content"}
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            return None
    if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        return None
    cleaned: dict[str, Any] = {"model": model, "messages": [dict(message) for message in messages]}
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        return None
    cleaned["stream"] = stream
    for name in _FLOAT_FIELDS:
        value = data.get(name)
        if value is not None and not _is_number(value):
            return None
        if name in data:
            cleaned[name] = None if value is None else float(value)
    for name in _INT_FIELDS:
        value = data.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return None
        if name in data:
            cleaned[name] = value
    if "stream_options" in data:
        if not isinstance(data["stream_options"], dict):
            return None
        cleaned["stream_options"] = data["stream_options"]
    if "stop" in data:
        cleaned["stop"] = data["stop"]
    if "user" in data:
        user = data["user"]
        if not isinstance(user, str) or not 0 < len(user) <= 100 or user != user.strip():
            return None
        cleaned["user"] = user
    if "n" in data and (data["n"] != 1 or isinstance(data["n"], bool)):
        return None
    if "logprobs" in data and data["logprobs"] is not False:
        return None
    return cleaned


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
