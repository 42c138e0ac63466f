"""Per-generation event buffers in Redis Streams: what makes streaming resumable.

A generation writes its events (``message.created``, ``token``, ``citation``, ``done``,
``error``) to its own stream; every client connection — SSE, WebSocket, the OpenAI API — reads
that stream. The Redis entry id is the SSE event id, so a client reconnecting with
``Last-Event-ID`` to any replica continues from exactly the next event: no regeneration, no
duplicates, no gaps. Streams expire an hour after their last event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog

from tenants.redis import execute_with_scripts, lua_source, script_queue, tenant_key

logger = structlog.get_logger(__name__)

STREAM_TTL_SECONDS = 3600
FRAME_SECONDS = 0.02  # tokens arriving within one frame (50 per second) share one event
# How long an announced event (generation.started) waits for a first token to share its write. It
# delays no token, only the response headers of a model slower than this (the edge waits for the
# cache decision). At 3 ms a loaded worker sent it alone for half its turns: one more write for the
# worker, one more notification and socket write for the web (2.5 -> 2.0 writes a turn, +5-9%
# streamed requests/s in the quick loop).
ANNOUNCE_GRACE_SECONDS = 0.05
STREAM_MAX_EVENTS = 50_000  # far above any answer; bounds a runaway generation's memory
TERMINAL_EVENTS = frozenset({"done", "error"})
# A worker took the turn and looked it up in the response cache: {"cache": "exact"|"semantic"|"miss"}.
STARTED_EVENT = "generation.started"
# How a stream ends when its answer broke off after some of it was streamed.
INTERRUPTED_ERROR = {
    "message": "The answer was interrupted; please try again.",
    "type": "server_error",
    "code": "generation_interrupted",
}
JOBS_STREAM = "parley:generation:jobs"
JOBS_GROUP = "generators"


def notify_channel(stream_key: str) -> str:
    """The pub/sub channel on which writers announce new events of a stream (chat.transports.hub)."""
    return f"{stream_key}:n"


# One write of a publisher whose turn names an inbox: the events, and a notification on the inbox
# that carries them — the stream's key, the id of the entry before them, then each event's id,
# type and data, one per line (the data is JSON, whose strings escape newlines: it has none). The
# web process that follows the turn takes them from the notification when it has everything up to
# that previous entry, without reading the stream (chat.transports.hub.StreamHub.deliver).
# ARGV: MAXLEN, the TTL to set ('' for none), the stream's own channel, the inbox, then type and
# data for each event.
_WRITE_AND_NOTIFY = lua_source("chat/lua/stream_write_and_notify.lua")


def notify_on(pipe, stream_key: str, inbox: str | None = None) -> None:
    """Announce new events of a stream: on its own channel (any process following it), and on the
    inbox of the web process that started the turn, when its job names one (that process follows
    its own turns without a channel subscription per stream; chat.transports.hub)."""
    pipe.publish(notify_channel(stream_key), b"")
    if inbox:
        pipe.publish(inbox, stream_key)


def generation_stream_key(schema_name: str, generation_id: str) -> str:
    return tenant_key(schema_name, "gen", generation_id)


def cancel_key(schema_name: str, generation_id: str) -> str:
    return tenant_key(schema_name, "gen", generation_id, "cancel")


def generation_owner_key(schema_name: str, generation_id: str) -> str:
    """Who may read or cancel a generation: its conversation and end user."""
    return tenant_key(schema_name, "gen", generation_id, "owner")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    id: str
    type: str
    data: dict[str, Any]

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS


async def publish(
    redis: aioredis.Redis, key: str, event_type: str, data: dict[str, Any], *, inbox: str | None = None
) -> str:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(
            key,
            {"type": event_type, "data": orjson.dumps(data)},
            maxlen=STREAM_MAX_EVENTS,
            approximate=True,
        )
        pipe.expire(key, STREAM_TTL_SECONDS)
        notify_on(pipe, key, inbox)
        entry_id, *_rest = await pipe.execute()
    return entry_id_of(entry_id)


def entry_id_of(reply: bytes | str) -> str:
    """A stream entry's id as Redis returned it (XADD's reply, an XREAD entry), as text."""
    return reply.decode() if isinstance(reply, bytes) else reply


class CoalescingPublisher:
    """Publishes one generation's events in order, merging tokens that arrive within one frame.

    The first event goes out at once (time to first token); after it, tokens that arrive less
    than ``frame_seconds`` after the last write are merged into a single ``token`` event written
    when the frame ends. A model streaming 20 tokens/s still gets one event per token; a burst
    (a fast model, a cache hit) becomes a handful of writes instead of one Redis round trip per
    token — for the worker, for Redis, and for every client reading the stream.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key: str,
        *,
        frame_seconds: float = FRAME_SECONDS,
        is_buffered: bool = False,
        inbox: str | None = None,
        inbox_events: bool = False,
    ) -> None:
        self.redis = redis
        self.key = key
        self.inbox = inbox  # the starting web process's notification channel (notify_on)
        self.inbox_events = inbox_events  # its notifications carry the events (_WRITE_AND_NOTIFY)
        self.frame_seconds = frame_seconds
        # Nobody watches the tokens arrive (a non-streamed request waits for the end): everything
        # is written once, with the terminal event (close_on).
        self.is_buffered = is_buffered
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._last_write = -math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self.writes = 0

    async def add(self, event_type: str, data: dict[str, Any]) -> None:
        if event_type == "token" and self._pending and self._pending[-1][0] == "token":
            self._pending[-1][1]["text"] += data["text"]
        else:
            self._pending.append((event_type, dict(data)))
        if self.is_buffered:
            return
        wait = self._last_write + self.frame_seconds - time.monotonic()
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self._flush_later)

    def announce(self, event_type: str, data: dict[str, Any]) -> None:
        """Publish an event soon, in the background and outside the token frames: the caller goes
        on (calling the model), and it delays no token after it. A write within ``ANNOUNCE_GRACE``
        (a fast model's first token) takes it along — one write and one notification instead of
        two; otherwise it is written alone when the grace ends. Events added later still follow
        it: every write takes what is pending, in order, under the lock."""
        self._pending.append((event_type, dict(data)))
        if self.is_buffered or self._timer is not None:
            return
        self._timer = asyncio.get_running_loop().call_later(ANNOUNCE_GRACE_SECONDS, self._announce_later)

    def _announce_later(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush(is_out_of_frame=True))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The turn goes on; its next write reports Redis trouble if it lasts.
            logger.warning("stream_background_write_failed", key=self.key, error=repr(task.exception()))

    async def close(self, event_type: str, data: dict[str, Any]) -> None:
        """Publish the terminal event after everything pending."""
        self._pending.append((event_type, dict(data)))
        await self.flush(is_terminal=True)

    async def close_on(self, pipe, event_type: str, data: dict[str, Any]) -> QueuedClose:
        """Queue everything pending and the terminal event on ``pipe``, for the caller to execute
        with its other end-of-turn writes (nothing may be added after); then hand the pipeline's
        replies to the returned object's ``finish``."""
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self._pending = [*self._pending, (event_type, dict(data))], []
            first = len(pipe)
            self._queue(pipe, batch, is_terminal=True)
            return QueuedClose(publisher=self, batch=batch, replies=slice(first, len(pipe)))

    async def rewrite(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Write a closing batch on its own (its write with the turn's end failed)."""
        async with self._lock:
            await self._write(batch, is_terminal=True)

    async def _write(self, batch: list[tuple[str, dict[str, Any]]], *, is_terminal: bool) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self._queue(pipe, batch, is_terminal=is_terminal)
            for reply in await execute_with_scripts(pipe, self.redis):
                if isinstance(reply, Exception):
                    raise reply

    def _queue(self, pipe, batch: list[tuple[str, dict[str, Any]]], *, is_terminal: bool) -> None:
        sets_ttl = is_terminal or self.writes == 0
        self.writes += 1
        if self.inbox and self.inbox_events:  # the web process takes the events from its notification
            ttl = STREAM_TTL_SECONDS if sets_ttl else ""
            arguments: list[int | str | bytes] = [STREAM_MAX_EVENTS, ttl, notify_channel(self.key), self.inbox]
            for event_type, data in batch:
                arguments += [event_type, orjson.dumps(data)]
            script_queue(pipe, _WRITE_AND_NOTIFY, 1, self.key, *arguments)
            return
        for event_type, data in batch:
            pipe.xadd(
                self.key,
                {"type": event_type, "data": orjson.dumps(data)},
                maxlen=STREAM_MAX_EVENTS,
                approximate=True,
            )
        if sets_ttl:
            pipe.expire(self.key, STREAM_TTL_SECONDS)
        notify_on(pipe, self.key, self.inbox)

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        self._background.add(task)
        task.add_done_callback(self._background_done)

    async def flush(self, *, is_terminal: bool = False, is_out_of_frame: bool = False) -> None:
        async with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self._pending = self._pending, []
            if not batch:
                return
            await self._write(batch, is_terminal=is_terminal)
            if not is_out_of_frame:
                self._last_write = time.monotonic()


@dataclass(frozen=True, slots=True)
class QueuedClose:
    """A stream's last events, queued on a caller's pipeline (``CoalescingPublisher.close_on``)."""

    publisher: CoalescingPublisher
    batch: list[tuple[str, dict[str, Any]]]
    replies: slice  # the pipeline's replies to their commands

    async def finish(self, results: list) -> None:
        """Make sure the stream ends although its write failed (say, Redis refusing writes for
        a moment): followers would otherwise wait for a terminal event that never comes. A write
        that failed whole is made again; one that went through in part ends the stream with an
        error instead, rather than repeat what its followers already have."""
        replies = results[self.replies]
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if not failed:
            return
        is_all_lost = len(failed) == len(replies)
        batch = self.batch if is_all_lost else [("error", {**INTERRUPTED_ERROR, "partial": True})]
        try:
            await self.publisher.rewrite(batch)
        except Exception:
            logger.exception("stream_close_rewrite_failed", key=self.publisher.key)


def decode_event(entry_id: bytes | str, fields: dict) -> StreamEvent:
    return StreamEvent(
        id=entry_id_of(entry_id),
        type=fields[b"type"].decode(),
        data=orjson.loads(fields[b"data"]),
    )


def events_of_notification(payload: str) -> tuple[str, str, list[StreamEvent]] | None:
    """(stream key, the id before the events, the events) of an inbox notification that carries
    them; None for one that names only the stream's key."""
    if "\n" not in payload:
        return None
    key, previous, *fields = payload.split("\n")
    events = [
        StreamEvent(id=fields[index], type=fields[index + 1], data=orjson.loads(fields[index + 2]))
        for index in range(0, len(fields), 3)
    ]
    return key, previous, events


async def read(
    redis: aioredis.Redis, key: str, *, after: str = "0-0", block_ms: int = 15_000
) -> AsyncIterator[StreamEvent | None]:
    """Events after ``after`` until a terminal one. Yields ``None`` when ``block_ms`` passed
    without an event, so the transport can send a heartbeat."""
    last = after
    while True:
        response = await redis.xread({key: last}, block=block_ms, count=256)
        if not response:
            yield None
            continue
        for entry_id, fields in response[0][1]:
            event = decode_event(entry_id, fields)
            last = event.id
            yield event
            if event.is_terminal:
                return


async def exists(redis: aioredis.Redis, key: str) -> bool:
    return bool(await redis.exists(key))


def parse_last_event_id(value: str | None) -> str:
    """A client's Last-Event-ID, validated as a Redis stream id (else start from the beginning)."""
    if not value:
        return "0-0"
    milliseconds, _, sequence = value.strip().partition("-")
    if milliseconds.isdigit() and sequence.isdigit():
        return f"{int(milliseconds)}-{int(sequence)}"
    return "0-0"
