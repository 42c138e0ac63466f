"""One reader of generation streams per web process, shared by every connection it serves.

Reading each client's stream with its own blocking ``XREAD`` costs a Redis connection per open
SSE or WebSocket client: 10,000 clients would hold 10,000 connections (Redis's default limit) and
as many pending commands. Instead, publishers ``PUBLISH`` a notification on the stream's channel
after each write (chat.streams), and each process's hub holds one pub/sub connection subscribed to
the channels of the streams its clients follow. A notification marks the stream dirty; a single
fetcher task reads every dirty stream in one non-blocking ``XREAD`` and hands the events to the
streams' subscribers. Pub/sub may drop a message (a reconnect): every followed stream is re-read
at once after the listener recovers, and a slow sweep (``SWEEP_SECONDS``) re-reads them anyway,
so an event is at worst that late, never lost. The sweep is kept slow on purpose: re-reading
5,000 idle streams every second cost a web process enough CPU to delay the live ones. An idle
client costs a queue and a channel subscription — no Redis connection, no pending command.

A turn the process starts itself (the OpenAI edge) needs no channel of its own: the hub's
*inbox* — one channel per process, subscribed once — is named in the turn's job, and the worker
notifies it with the stream's key besides the stream's channel. Following such a turn costs no
Redis command: it is registered before the job is queued (so no notification can come before it)
and dropped without an UNSUBSCRIBE. A client resuming that stream elsewhere uses its channel.
The worker's inbox notification carries the events it announces, with the id of the entry before
them (chat.streams): a follower that has everything up to that entry takes them as they are, with
no read of the stream on the first token's path; one that lacks some gets the stream read.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog
from redis.typing import KeyT, StreamIdT

from chat.streams import StreamEvent, decode_event, events_of_notification, notify_channel
from tenants.redis import get_loop_redis

logger = structlog.get_logger(__name__)

SWEEP_SECONDS = 10.0
XREAD_KEYS_PER_CALL = 500  # bounds one command's size when many streams are dirty at once
XREAD_COUNT = 256


def _id_tuple(entry_id: str) -> tuple[int, int]:
    milliseconds, _, sequence = entry_id.partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(eq=False)
class Subscription:
    key: str
    last: str
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False


class StreamHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.subscribers: dict[str, set[Subscription]] = {}
        self.dirty: set[str] = set()
        self.wake = asyncio.Event()
        # Set when a channel is subscribed: the listener waits for it rather than polling (a 50 ms
        # poll added 50 ms to the first event of a stream when the process had followed none).
        self.has_channels = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.lock = asyncio.Lock()  # channel (un)subscriptions, one at a time on the pub/sub connection
        self.channel_keys: set[str] = set()  # streams whose own channel is subscribed
        self.inbox = f"parley:hub:{uuid.uuid4().hex}"
        self.is_inbox_subscribed = False

    def _start(self) -> None:
        if not self.tasks:
            self.tasks = [
                asyncio.create_task(self._listen(), name="stream-hub-listen"),
                asyncio.create_task(self._fetch_forever(), name="stream-hub-fetch"),
                asyncio.create_task(self._sweep(), name="stream-hub-sweep"),
            ]

    async def subscribe(self, key: str, after: str) -> Subscription:
        """Follow any stream: through its own notification channel."""
        subscription = Subscription(key=key, last=after)
        async with self.lock:
            self.subscribers.setdefault(key, set()).add(subscription)
            if key not in self.channel_keys:
                await self.pubsub.subscribe(notify_channel(key))
                self.channel_keys.add(key)
                self.has_channels.set()
        self._start()
        self.mark(key)  # the events written before the subscription
        return subscription

    async def inbox_channel(self) -> str:
        """This process's notification channel, subscribed: name it in the jobs of turns whose
        streams are followed through ``register``."""
        if not self.is_inbox_subscribed:
            async with self.lock:
                if not self.is_inbox_subscribed:
                    await self.pubsub.subscribe(self.inbox)
                    self.is_inbox_subscribed = True
                    self.has_channels.set()
            self._start()
        return self.inbox

    def register(self, key: str) -> Subscription:
        """Follow a stream not written yet, whose writers will notify this hub's inbox (a turn
        started here, its job naming ``inbox_channel()``): no Redis command. Register before the
        job is queued; ``unsubscribe`` when done."""
        subscription = Subscription(key=key, last="0-0")
        self.subscribers.setdefault(key, set()).add(subscription)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        """Stop following (again: nothing happens)."""
        key = subscription.key
        followers = self.subscribers.get(key)
        if followers is None or subscription not in followers:
            return
        followers.discard(subscription)
        if followers:
            return
        del self.subscribers[key]
        self.dirty.discard(key)
        if key in self.channel_keys:
            async with self.lock:
                if key in self.subscribers or key not in self.channel_keys:
                    return  # followed again meanwhile (its channel stays), or already dropped
                self.channel_keys.discard(key)
                with contextlib.suppress(Exception):  # the connection may be gone: nothing to undo then
                    await self.pubsub.unsubscribe(notify_channel(key))

    def advance(self, subscription: Subscription, entry_id: str) -> None:
        """Its follower needs no event up to ``entry_id`` (one it wrote itself): a notification
        whose events follow that entry is delivered without reading the stream."""
        if _id_tuple(entry_id) > _id_tuple(subscription.last):
            subscription.last = entry_id

    def deliver(self, payload: str) -> None:
        """An inbox notification: the events it carries go straight to the followers that have
        everything before them; a follower missing some (or a notification with no events) gets
        the stream read."""
        carried = events_of_notification(payload)
        if carried is None:
            self.mark(payload)
            return
        key, previous, events = carried
        before = _id_tuple(previous)
        for subscription in list(self.subscribers.get(key, ())):
            if _id_tuple(subscription.last) < before:
                self.mark(key)  # a gap: what came between is read from the stream
            else:
                _hand_over(subscription, events)

    def hand_over(self, subscription: Subscription, events: list[StreamEvent]) -> None:
        """Events this process wrote to the subscription's stream itself (a cached answer the edge
        stored): to its follower, with no read of the stream."""
        _hand_over(subscription, events)

    def mark(self, key: str) -> None:
        self.dirty.add(key)
        self.wake.set()

    async def _listen(self) -> None:
        while True:
            _raise_if_cancelled()
            try:
                if not self.pubsub.subscribed:
                    self.has_channels.clear()
                    await self.has_channels.wait()
                    continue
                message = await self.pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "message":
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    if channel == self.inbox:  # the stream's key, and maybe its new events
                        data = message["data"]
                        self.deliver(data.decode() if isinstance(data, bytes) else data)
                    else:
                        self.mark(channel.removesuffix(":n"))
            except asyncio.CancelledError:
                raise
            except Exception:  # a dropped connection: notifications may be lost until it reconnects
                logger.warning("stream_hub_listen_failed", exc_info=True)
                await asyncio.sleep(0.5)
                self._mark_all()

    def _mark_all(self) -> None:
        self.dirty.update(self.subscribers)
        if self.dirty:
            self.wake.set()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self._mark_all()

    async def _fetch_forever(self) -> None:
        while True:
            _raise_if_cancelled()
            await self.wake.wait()
            self.wake.clear()
            keys = [key for key in self.dirty if key in self.subscribers]
            self.dirty.clear()
            for start in range(0, len(keys), XREAD_KEYS_PER_CALL):
                try:
                    await self._fetch(keys[start : start + XREAD_KEYS_PER_CALL])
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.warning("stream_hub_fetch_failed", exc_info=True)
                    self.dirty.update(keys[start:])  # retried at the next wake-up or sweep
                    await asyncio.sleep(0.2)
                    break

    async def _fetch(self, keys: list[str]) -> None:
        positions: dict[KeyT, StreamIdT] = {}  # (as redis-py's xread takes them: a dict, invariant)
        for key in keys:
            followers = self.subscribers.get(key)
            if followers:
                positions[key] = min((subscription.last for subscription in followers), key=_id_tuple)
        if not positions:
            return
        response = await self.redis.xread(positions, count=XREAD_COUNT)
        for raw_key, entries in response or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            events = [decode_event(entry_id, fields) for entry_id, fields in entries]
            for subscription in list(self.subscribers.get(key, ())):
                _hand_over(subscription, events)
            if len(entries) == XREAD_COUNT:
                self.mark(key)  # more to read


def _hand_over(subscription: Subscription, events: list[StreamEvent]) -> None:
    """The events the follower does not have yet (ids past its last), up to a terminal one."""
    last = _id_tuple(subscription.last)
    for event in events:
        if _id_tuple(event.id) > last and not subscription.done:
            subscription.queue.put_nowait(event)
            subscription.last = event.id
            subscription.done = event.is_terminal


def _raise_if_cancelled() -> None:
    """redis-py may swallow a cancellation that lands inside one of its reads: a hub task would
    then go on forever, and closing its event loop (a server shutting down) would wait for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, StreamHub] = weakref.WeakKeyDictionary()


def get_hub() -> StreamHub:
    """The hub of the running event loop (one per web process)."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = _hubs[loop] = StreamHub(get_loop_redis())
    return hub


async def follow_batches(
    key: str, *, after: str = "0-0", block_ms: int = 15_000, subscription: Subscription | None = None
) -> AsyncGenerator[list[StreamEvent] | None, None]:
    """The stream's events after ``after`` as they arrive, each batch everything that had arrived
    by then, until a terminal one; ``None`` after ``block_ms`` without an event (the transport's
    heartbeat). A transport writes a batch to its client at once: a burst of events (a fast model
    flushing its tokens with the answer's end) costs one socket write, not one per event.
    ``subscription``: one made already (``StreamHub.register``), for ``key``."""
    hub = get_hub()
    if subscription is None:
        if after != "0-0":  # a resume: the answer may have ended already, at or before ``after``
            ended = await _ended_by(hub.redis, key, after)
            if ended is not None:
                # Its terminal event again (the client drops what it has seen by id): the follower
                # learns the answer is over, instead of keep-alives until it gives up.
                yield [ended]
                return
        subscription = await hub.subscribe(key, after)
    queue = subscription.queue
    try:
        while True:
            if queue.empty():
                try:
                    async with asyncio.timeout(block_ms / 1000):
                        first = await queue.get()
                except TimeoutError:
                    yield None
                    continue
            else:
                first = queue.get_nowait()
            batch = [first]
            while not batch[-1].is_terminal and not queue.empty():
                batch.append(queue.get_nowait())
            yield batch
            if batch[-1].is_terminal:
                return
    finally:
        await hub.unsubscribe(subscription)


async def _ended_by(redis: aioredis.Redis, key: str, after: str) -> StreamEvent | None:
    """The stream's terminal event if it is its last entry and no later than ``after``."""
    newest = await redis.xrevrange(key, count=1)
    if not newest:
        return None
    event = decode_event(*newest[0])
    return event if event.is_terminal and _id_tuple(event.id) <= _id_tuple(after) else None


async def follow(key: str, *, after: str = "0-0", block_ms: int = 15_000) -> AsyncGenerator[StreamEvent | None, None]:
    """Events of the stream after ``after`` until a terminal one; ``None`` after ``block_ms``
    without an event (the transport's heartbeat). The same contract as chat.streams.read."""
    async with contextlib.aclosing(follow_batches(key, after=after, block_ms=block_ms)) as batches:
        async for batch in batches:
            if batch is None:
                yield None
                continue
            for event in batch:
                yield event
