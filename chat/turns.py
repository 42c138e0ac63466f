"""Following, waiting for and cancelling a started turn from the web side (turns start at
chat.turn_core.turn_begin): the synchronous views' helpers over the generation's event stream
(chat.streams)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import structlog

from chat.selectors import EndUser
from chat.streams import (
    STARTED_EVENT,
    STREAM_TTL_SECONDS,
    cancel_key,
    generation_owner_key,
    generation_stream_key,
)
from tenants.connection import connection
from tenants.errors import NotFound, ParleyError
from tenants.redis import get_redis

if TYPE_CHECKING:
    from chat.turn_core import StartedTurn

logger = structlog.get_logger(__name__)


def generation_get_for(*, generation_id: str, end_user: EndUser) -> str:
    """The stream key of a generation the caller may follow or cancel (NotFound otherwise)."""
    try:
        generation_id = str(uuid.UUID(generation_id))
    except ValueError:
        raise NotFound("No such generation.", param="id") from None
    schema_name = connection.schema_name
    raw = cast(bytes | None, get_redis().get(generation_owner_key(schema_name, generation_id)))
    if raw is None:
        raise NotFound("No such generation (or it expired).", param="id")
    owner = json.loads(raw)
    if not end_user.sees_all and (owner["end_user_kind"], owner["end_user_id"]) != (end_user.kind, end_user.id):
        raise NotFound("No such generation (or it expired).", param="id")
    return generation_stream_key(schema_name, generation_id)


def generation_cancel(*, generation_id: str, end_user: EndUser) -> None:
    generation_get_for(generation_id=generation_id, end_user=end_user)
    get_redis().set(cancel_key(connection.schema_name, str(uuid.UUID(generation_id))), 1, ex=STREAM_TTL_SECONDS)


# How long an SSE response's headers wait for the worker's cache decision (X-Parley-Cache). The
# first token comes after that decision anyway, so the wait costs a streaming client nothing;
# past it (workers backlogged) the response starts without the header.
CACHE_HEADER_WAIT_MS = 2_000


def turn_cache_layer(*, stream_key: str, timeout_ms: int = CACHE_HEADER_WAIT_MS) -> str | None:
    """``exact`` | ``semantic`` | ``miss`` once the generation worker has looked the turn up in the
    response cache; None if it has not within ``timeout_ms``."""
    if not connection.in_atomic_block:
        connection.close()  # no database work is left in the request: do not hold a connection
    redis = get_redis()
    last = "0-0"
    deadline = time.monotonic() + timeout_ms / 1000
    while (remaining := deadline - time.monotonic()) > 0:
        response = cast(
            list[Any] | None, redis.xread({stream_key: last}, block=max(1, int(remaining * 1000)), count=64)
        )
        for _key, entries in response or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields[b"type"] == STARTED_EVENT.encode():
                    return json.loads(fields[b"data"])["cache"]
                if fields[b"type"] in (b"done", b"error"):
                    return None
    return None


def streamed_turn_headers(started: StartedTurn) -> dict[str, str]:
    """An SSE response's headers for a started turn: its generation id, the admission's rate-limit
    headers, and ``X-Parley-Cache`` once the worker (or the door, for an exact hit) has decided."""
    headers = {"X-Parley-Generation-Id": started.generation_id, **started.headers}
    layer = started.cache_layer or turn_cache_layer(stream_key=started.stream_key)
    if layer is not None:
        headers["X-Parley-Cache"] = layer
    return headers


@dataclass(frozen=True, slots=True)
class WaitedTurn:
    message_id: str | None
    error: ParleyError | None
    text: str = ""
    done: dict | None = None  # the ``done`` event's data: usage, finish reason, provider, timings


_ERROR_STATUS = {"rate_limit_error": 429, "invalid_request_error": 400}
_CODE_STATUS = {"provider_timeout": 504, "provider_unavailable": 503}


def generation_error(data: dict) -> ParleyError:
    """A generation's ``error`` event as the error a waiting (non-streamed) caller answers with."""
    status = _CODE_STATUS.get(data.get("code", ""), _ERROR_STATUS.get(data.get("type", ""), 502))
    error = ParleyError(data["message"], code=data.get("code"), status_code=status)
    error.error_type = data.get("type", "api_error")
    return error


def turn_wait(*, stream_key: str, timeout_seconds: float = 600) -> WaitedTurn:
    """Block until the generation ends (for callers that did not ask for a stream), collecting
    the answer from its events.

    The database connection goes back to the pool first: a request waiting seconds for a model
    must not hold one (at a few hundred waiting clients the pool ran dry).
    """
    if not connection.in_atomic_block:
        connection.close()
    redis = get_redis()
    last = "0-0"
    parts: list[str] = []
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        response = cast(list[Any] | None, redis.xread({stream_key: last}, block=5_000, count=512))
        for _key, entries in response or []:
            for entry_id, fields in entries:
                last = entry_id
                event_type = fields[b"type"]
                if event_type == b"token":
                    parts.append(json.loads(fields[b"data"])["text"])
                elif event_type == b"done":
                    data = json.loads(fields[b"data"])
                    return WaitedTurn(message_id=data["message_id"], error=None, text="".join(parts), done=data)
                elif event_type == b"error":
                    data = json.loads(fields[b"data"])
                    return WaitedTurn(
                        message_id=data.get("message_id"), error=generation_error(data), text="".join(parts)
                    )
    return WaitedTurn(
        message_id=None, error=ParleyError("The answer took too long.", code="generation_timeout", status_code=504)
    )
