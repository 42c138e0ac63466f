"""The asyncio Redis clients: their pool hands out a free connection without a timer, still waits
(and gives up) when none is free, and their sockets carry the kernel's dead-peer limits instead of
a per-command timeout."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError

from tenants.redis import ASYNC_SOCKET_OPTIONS, REDIS_SOCKET_TIMEOUT, LoopConnectionPool, get_async_redis


def _client(*, max_connections: int, timeout: float) -> aioredis.Redis:
    return aioredis.Redis(
        connection_pool=LoopConnectionPool.from_url(
            settings.REDIS_URL, max_connections=max_connections, timeout=timeout
        )
    )


async def test_many_concurrent_commands_share_a_small_pool():
    client = _client(max_connections=3, timeout=5)
    pool = client.connection_pool
    try:
        replies = await asyncio.gather(*(client.incr("test:pool:counter") for _ in range(60)))
        assert sorted(replies) == list(range(1, 61))
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 3
        assert not pool._in_use_connections  # every connection went back
    finally:
        await client.delete("test:pool:counter")
        await client.aclose()


@contextlib.asynccontextmanager
async def _only_connection_held(*, pool_wait_seconds: float):
    """A client whose pool allows one connection, that connection taken: (client, pool, held)."""
    client = _client(max_connections=1, timeout=pool_wait_seconds)
    pool = client.connection_pool
    try:
        yield client, pool, await pool.get_connection()
    finally:
        await client.aclose()


async def test_a_command_waits_for_a_connection_to_be_released():
    async with _only_connection_held(pool_wait_seconds=5) as (client, pool, held):
        waiting = asyncio.create_task(client.ping())
        await asyncio.sleep(0.1)
        assert not waiting.done()  # no free connection, and the pool may not open a second one
        await pool.release(held)
        assert await asyncio.wait_for(waiting, 5) is True


async def test_a_command_gives_up_when_no_connection_is_released():
    async with _only_connection_held(pool_wait_seconds=0.2) as (client, pool, held):
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        await pool.release(held)
        assert await client.ping() is True


async def test_a_broken_connection_is_replaced_when_taken():
    client = _client(max_connections=1, timeout=5)
    try:
        assert await client.ping() is True
        (connection,) = client.connection_pool._available_connections
        connection._writer.transport.abort()  # the server's side closed it while it sat in the pool
        await asyncio.sleep(0.05)
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_async_sockets_carry_keepalive_and_a_user_timeout_instead_of_a_read_timeout():
    client = get_async_redis()
    try:
        await client.ping()
        (connection,) = client.connection_pool._available_connections
        assert connection.socket_timeout is None
        sock = connection._writer.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        for option, value in ASYNC_SOCKET_OPTIONS.items():
            assert sock.getsockopt(socket.IPPROTO_TCP, option) == value
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == REDIS_SOCKET_TIMEOUT * 1000
    finally:
        await client.aclose()


async def test_async_connections_pack_commands_in_c_exactly_as_redis_py_does():
    """The loop's client packs with hiredis; the bytes are redis-py's own asyncio packing's, for
    the arguments our scripts and streams send (a multi-word command, text, bytes, numbers, a
    script longer than redis-py's buffer cutoff), and the commands work against Redis."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    client = get_async_redis()
    packed_in_c = client.connection_pool.make_connection()
    packed_in_python = Connection()
    script = "return {KEYS[1], ARGV[1]} -- " + "x" * 7_000
    for args in (
        ("SET", "t:acme:é", "ünïcode", "EX", 30),
        ("CONFIG GET", "maxmemory"),
        (b"XADD", b"stream", b"*", "data", b'{"text":"\\u00e9"}', 1.5, -3),
        ("EVAL", script, 1, "key", "value"),
    ):
        assert b"".join(packed_in_c.pack_command(*args)) == b"".join(packed_in_python.pack_command(*args)), args
    assert type(packed_in_c).__mro__[1].__name__ == "_PackedByHiredis"
    with pytest.raises(DataError):
        packed_in_c.pack_command("SET", "key", None)
    try:
        assert await client.eval(script, 1, "t:test:packed", "é") == [b"t:test:packed", "é".encode()]
        await client.set("t:test:packed", "ünïcode", ex=30)
        assert (await client.get("t:test:packed")).decode() == "ünïcode"
    finally:
        await client.delete("t:test:packed")
        await client.aclose()


async def test_scripts_queued_by_sha_run_once_even_after_redis_lost_them():
    """``script_queue`` sends a script's SHA1; ``execute_with_scripts`` runs each one Redis
    answered NOSCRIPT again by its text, once, its reply in its place. An EVALSHA of a script it
    was never given stays an error."""
    from redis.exceptions import NoScriptError

    from tenants.redis import execute_with_scripts, script_queue

    client = get_async_redis()
    counter = "t:test:scripts:counter"
    increment = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    try:
        await client.delete(counter)
        await client.script_flush()
        async with client.pipeline(transaction=False) as pipe:
            script_queue(pipe, increment, 1, counter, 1)
            pipe.set("t:test:scripts:other", "x")
            script_queue(pipe, increment, 1, counter, 10)
            pipe.evalsha("0" * 40, 0)
            replies = await execute_with_scripts(pipe, client)
        assert replies[:3] == [1, True, 11]
        assert isinstance(replies[3], NoScriptError)
        assert int(await client.get(counter)) == 11  # each ran once

        async with client.pipeline(transaction=False) as pipe:  # loaded now: by SHA1 alone
            script_queue(pipe, increment, 1, counter, 100)
            assert await execute_with_scripts(pipe, client) == [111]
    finally:
        await client.delete(counter, "t:test:scripts:other")
        await client.aclose()
