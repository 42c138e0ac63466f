"""Redis clients and the key convention for tenant-owned Redis data.

Every key a tenant owns starts with ``t:<schema>:`` so that deleting a tenant can find and purge
all of them with one SCAN pattern, and so that no code can build a key without naming a tenant.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import weakref
from functools import cache
from pathlib import Path
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

# Redis down or too slow to answer: callers fall back (or refuse, with a 503) rather than fail.
REDIS_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
REDIS_SOCKET_TIMEOUT = 30
PURGE_BATCH = 500  # keys per UNLINK: large enough to be quick, small enough not to block Redis


# Connections per pool: a pool that runs out makes its caller wait (up to POOL_WAIT_SECONDS) rather
# than fail. redis-py's default pool raises "Too many connections" past 100, which a web process
# reached when several hundred SSE clients connected at once (each request's sync part runs in its
# own thread).
POOL_WAIT_SECONDS = 20
DEFAULT_MAX_CONNECTIONS = 200


# redis-py's command methods are typed once for its sync and asyncio clients alike (every reply
# ``Awaitable[Any] | Any``): replies of the sync client are ``cast`` to what the command returns.
@cache
def get_redis() -> redis.Redis:
    # Blocking reads (XREAD BLOCK ≤ 15 s) must not hit the socket timeout (redis-py's default is 5 s).
    pool = redis.BlockingConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=getattr(settings, "REDIS_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
        timeout=POOL_WAIT_SECONDS,
        health_check_interval=30,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
    )
    return redis.Redis(connection_pool=pool)


# The asyncio clients bound their reads by the kernel instead of a timer per command: redis-py
# arms an asyncio timeout around every send and every reply when ``socket_timeout`` is set, and
# those timers were ~7% of the edge's and the generation workers' CPU (tests/perf/RESULTS.md).
# A peer that vanished is still noticed within ~30 s: keep-alive probes an idle connection, and
# TCP_USER_TIMEOUT fails one whose sent command goes unacknowledged. Blocking reads (XREAD
# BLOCK, pub/sub) pass their own timeouts.
ASYNC_SOCKET_OPTIONS = {
    getattr(socket, name): value
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", REDIS_SOCKET_TIMEOUT * 1000),
    )
    if hasattr(socket, name)  # Linux has all four; macOS the first three under other names
}


class LoopConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, without its wait timer when a connection is free (the usual
    case): taking one then has no await before it is marked in use, so nothing can interleave."""

    async def get_connection(self, *args, **kwargs):
        if not self.can_get_connection():
            return await super().get_connection()  # wait for a release, up to POOL_WAIT_SECONDS
        connection = self.get_available_connection()
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection


class _PackedByHiredis:
    """Commands packed in C by hiredis, as redis-py's sync client does when hiredis is installed;
    its asyncio connections pack in Python, one bytes join per argument (the pipelines of a turn
    carry a few hundred arguments: ~15% of the edge's samples on the first token's path)."""

    _serializer = HiredisRespSerializer()

    def pack_command(self, *args):
        return self._serializer.pack(*args)


_packed_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packed_by_hiredis(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    packed = _packed_classes.get(connection_class)
    if packed is None:
        packed = _packed_classes[connection_class] = type(
            f"Hiredis{connection_class.__name__}", (_PackedByHiredis, connection_class), {}
        )
    return packed


def get_async_redis() -> aioredis.Redis:
    # Not cached: an asyncio client is bound to the event loop it was first used on.
    pool = LoopConnectionPool.from_url(
        settings.REDIS_URL,
        max_connections=getattr(settings, "REDIS_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
        timeout=POOL_WAIT_SECONDS,
        socket_timeout=None,
        socket_keepalive=True,
        socket_keepalive_options=ASYNC_SOCKET_OPTIONS,
    )
    if HIREDIS_AVAILABLE:  # the URL's scheme chose the class (TCP, TLS, a Unix socket): keep it
        pool.connection_class = _packed_by_hiredis(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


_loop_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = weakref.WeakKeyDictionary()


def get_loop_redis() -> aioredis.Redis:
    """The asyncio client (and connection pool) of the running event loop, shared by all the
    coroutines on it: one per web process in production."""
    loop = asyncio.get_running_loop()
    client = _loop_clients.get(loop)
    if client is None:
        client = _loop_clients[loop] = get_async_redis()
    return client


def tenant_key(schema_name: str, *parts: str | int) -> str:
    return ":".join(["t", schema_name, *map(str, parts)])


def tenant_keys_purge(schema_name: str) -> int:
    """Delete every Redis key of a tenant; returns how many were deleted."""
    client = get_redis()
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=tenant_key(schema_name, "*"), count=PURGE_BATCH):
        batch.append(key)
        if len(batch) >= PURGE_BATCH:
            deleted += cast(int, client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += cast(int, client.unlink(*batch))
    return deleted


# --- consumer groups for the batch writers (usage metering, message persistence) ---------------


def stream_group_ensure(client: redis.Redis, stream: str, group: str) -> None:
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def stream_batch_read(
    client: redis.Redis, stream: str, group: str, *, consumer: str, batch_size: int, claim_idle_ms: int
) -> tuple[list[tuple[bytes, dict]], list[bytes]]:
    """A batch for ``consumer``: first the entries of consumers that died before acknowledging
    (pending longer than ``claim_idle_ms``), then new ones. Returns (entries, ids of pending
    entries trimmed from the stream meanwhile — already acknowledged here). Creates the group on
    first use."""
    try:
        claimed = cast(
            list[Any], client.xautoclaim(stream, group, consumer, min_idle_time=claim_idle_ms, count=batch_size)
        )
    except redis.exceptions.ResponseError as error:
        if "NOGROUP" not in str(error):
            raise
        stream_group_ensure(client, stream, group)
        claimed = cast(
            list[Any], client.xautoclaim(stream, group, consumer, min_idle_time=claim_idle_ms, count=batch_size)
        )
    entries = [entry for entry in claimed[1] if entry and entry[1]]
    trimmed = list(claimed[2]) if len(claimed) > 2 else []
    if trimmed:
        client.xack(stream, group, *trimmed)
    room = batch_size - len(entries)
    if room > 0:
        response = cast(list[Any] | None, client.xreadgroup(group, consumer, {stream: ">"}, count=room))
        for _stream_name, new_entries in response or []:
            entries += new_entries
    return entries, trimmed


# --- Lua scripts: one registry, by their SHA1 in pipelines ---------------------------------------

_SCRIPT_SOURCES: dict[str, str] = {}
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def lua_source(path: str) -> str:
    """A Lua script's text from its file (``path`` from the project's root, like
    ``chat/lua/admission_gate.lua``), registered here so that every pipeline that queued it by
    its SHA1 runs it again by its text when Redis lost it (``execute_with_scripts``). Scripts called
    on their own go through redis-py's ``register_script``, which recovers the same way."""
    source = (_PROJECT_ROOT / path).read_text(encoding="utf-8")
    script_sha(source)
    return source


@cache
def script_sha(source: str) -> str:
    """The SHA1 Redis names a Lua script by: hashed once per script and process (the hot paths
    queue their scripts by it on every request), and remembered for ``execute_with_scripts``."""
    sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    _SCRIPT_SOURCES[sha] = source
    return sha


def script_queue(pipe, source: str, numkeys: int, *keys_and_args) -> None:
    """Queue ``source`` on ``pipe`` by its SHA1 (EVALSHA), not its text: a turn's end sends four
    scripts, ~10 KB of text that Redis would hash again each time. Execute the pipeline (one
    without a transaction) with ``execute_with_scripts``, which copes with Redis not having it."""
    pipe.evalsha(script_sha(source), numkeys, *keys_and_args)


async def execute_with_scripts(pipe, client: aioredis.Redis) -> list:
    """``pipe.execute(raise_on_error=False)`` for a pipeline without a transaction, where every
    ``script_queue`` command Redis answered NOSCRIPT (it restarted, or its scripts were flushed)
    runs again by its text, its reply in its place: such a command did nothing, so each runs once.
    They run after the pipeline's other commands."""
    commands = [args for args, _options in pipe.command_stack]
    replies = await pipe.execute(raise_on_error=False)
    missing = [
        index
        for index, reply in enumerate(replies)
        if isinstance(reply, redis.exceptions.NoScriptError) and commands[index][1] in _SCRIPT_SOURCES
    ]
    if missing:
        async with client.pipeline(transaction=False) as again:
            for index in missing:
                _command, sha, *numkeys_keys_and_args = commands[index]
                again.eval(_SCRIPT_SOURCES[sha], *numkeys_keys_and_args)
            for index, reply in zip(missing, await again.execute(raise_on_error=False), strict=True):
                replies[index] = reply
    return replies
