"""Relaying a generation's tokens from the generation worker to the web process, two ways:

* ``redis_stream`` — what Parley does: the worker appends each event to the generation's Redis
  stream (``chat.streams.publish``: XADD + EXPIRE in one round trip) and the web process reads it
  (``chat.streams.read``: XREAD BLOCK, up to 256 entries at a time). Durable for an hour, so a
  client resumes with ``Last-Event-ID`` on any replica.
* ``channel_layer`` — Channels' way: the web process joins a group (``group_add``) and receives
  on its channel; the worker calls ``group_send`` for each event, through ``channels_redis``'s
  RedisChannelLayer. Fire-and-forget: nothing to resume from. All the channels of one process
  share one inbox in Redis, and ``capacity`` (default 100) bounds that inbox: past it,
  group_send drops messages silently — a web process relaying more than 100 unread tokens in
  all loses tokens. Set high here so that nothing is lost (any loss is counted).

The worker side and the web side each run their own event loop in their own thread, as they
run in their own processes in production; per-thread CPU time splits the cost between them.
Many generations run at once, each publishing its events as fast as Redis takes them.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from channels_redis.core import RedisChannelLayer

from chat.streams import generation_stream_key, publish, read
from tests.perf.chat_load import postgres_and_redis_pids, tree_cpu_seconds

RELAY_SCHEMA = "relay_bench"  # key prefix t:relay_bench:… for the streams, deleted afterwards
CHANNEL_PREFIX = "parley:bench:relay"
TOKEN = {"text": " word"}  # one token, as the engine publishes it
# Under redis-py's default 5 s socket timeout, which also bounds channels_redis's blocking pops.
RECEIVE_TIMEOUT_SECONDS = 4


@dataclass(frozen=True)
class RelayResult:
    mechanism: str
    events: int
    seconds: float
    publisher_cpu_s: float  # the generation worker's side
    reader_cpu_s: float  # the web process's side
    redis_cpu_s: float
    lost: int  # events published but never received

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds

    def cpu_us_per_event(self, side: str) -> float:
        seconds = {"publisher": self.publisher_cpu_s, "reader": self.reader_cpu_s, "redis": self.redis_cpu_s}[side]
        return seconds / self.events * 1e6


def _side(work: Callable[[], Awaitable[int]], start_gate: threading.Event | None) -> tuple[int, float]:
    """One side on a fresh event loop in this (pool) thread: its result and the thread's CPU time."""
    if start_gate is not None:
        start_gate.wait(30)
    started = time.thread_time()
    result = asyncio.run(work())
    return result, time.thread_time() - started


def _relay(
    mechanism: str,
    publisher: Callable[[threading.Event], Callable[[], Awaitable[int]]],
    reader: Callable[[threading.Event], Callable[[], Awaitable[int]]],
    events: int,
) -> RelayResult:
    readers_ready = threading.Event()
    redis_pids = postgres_and_redis_pids()["redis"]
    redis_before = tree_cpu_seconds(redis_pids)
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        reading = pool.submit(_side, reader(readers_ready), None)
        publishing = pool.submit(_side, publisher(readers_ready), readers_ready)
        (_, publisher_cpu), (received, reader_cpu) = publishing.result(120), reading.result(120)
    seconds = time.perf_counter() - started
    return RelayResult(
        mechanism=mechanism,
        events=events,
        seconds=seconds,
        publisher_cpu_s=publisher_cpu,
        reader_cpu_s=reader_cpu,
        redis_cpu_s=tree_cpu_seconds(redis_pids) - redis_before,
        lost=events - received,
    )


def redis_stream_relay(redis_url: str, *, generations: int, tokens: int) -> RelayResult:
    keys = [generation_stream_key(RELAY_SCHEMA, str(uuid.uuid4())) for _ in range(generations)]

    def reader(ready: threading.Event) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            client = aioredis.Redis.from_url(redis_url)

            async def one(key: str) -> int:
                return sum([event.type == "token" async for event in read(client, key, block_ms=10_000)])

            ready.set()  # a stream keeps what is published before the reader comes
            try:
                return sum(await asyncio.gather(*(one(key) for key in keys)))
            finally:
                await client.aclose()

        return work

    def publisher(_ready: threading.Event) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            client = aioredis.Redis.from_url(redis_url)

            async def one(key: str) -> None:
                for _ in range(tokens):
                    await publish(client, key, "token", TOKEN)
                await publish(client, key, "done", {"finish_reason": "stop"})

            try:
                await asyncio.gather(*(one(key) for key in keys))
            finally:
                await client.aclose()
            return 0

        return work

    try:
        return _relay("redis_stream", publisher, reader, generations * tokens)
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.unlink(*keys)


def channel_layer_relay(redis_url: str, *, generations: int, tokens: int) -> RelayResult:
    groups = [f"gen-{uuid.uuid4().hex}" for _ in range(generations)]
    capacity = generations * (tokens + 1) + 100  # the shared inbox may hold every event at once

    def layer() -> RedisChannelLayer:
        return RedisChannelLayer(hosts=[redis_url], prefix=CHANNEL_PREFIX, capacity=capacity)

    def reader(ready: threading.Event) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            channel_layer = layer()
            channels = [await channel_layer.new_channel() for _ in groups]
            for group, channel in zip(groups, channels, strict=True):
                await channel_layer.group_add(group, channel)

            async def one(group: str, channel: str) -> int:
                received = 0
                while True:
                    try:
                        message = await asyncio.wait_for(channel_layer.receive(channel), RECEIVE_TIMEOUT_SECONDS)
                    except (TimeoutError, redis.exceptions.TimeoutError):
                        break  # a dropped message: counted as lost
                    if message["type"] == "chat.done":
                        break
                    received += 1
                await channel_layer.group_discard(group, channel)
                return received

            ready.set()  # group_send reaches only channels already in the group
            try:
                return sum(await asyncio.gather(*(one(g, c) for g, c in zip(groups, channels, strict=True))))
            finally:
                await channel_layer.close_pools()

        return work

    def publisher(_ready: threading.Event) -> Callable[[], Awaitable[int]]:
        async def work() -> int:
            channel_layer = layer()

            async def one(group: str) -> None:
                for _ in range(tokens):
                    await channel_layer.group_send(group, {"type": "chat.token", **TOKEN})
                await channel_layer.group_send(group, {"type": "chat.done", "finish_reason": "stop"})

            try:
                await asyncio.gather(*(one(group) for group in groups))
            finally:
                await channel_layer.close_pools()
            return 0

        return work

    return _relay("channel_layer", publisher, reader, generations * tokens)
