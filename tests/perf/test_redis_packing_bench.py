"""What packing one turn's Redis commands costs the asyncio client: redis-py's own packer (Python,
one bytes join per argument) against hiredis's (C), which the loop's clients use (tenants.redis).

One streamed turn goes through the OpenAI edge (a key it already knows) and a generation worker,
in process, with every pipeline recorded; then all the recorded commands are packed by each
packer, rounds interleaved, and the two outputs compared byte for byte.
"""

from __future__ import annotations

import json
import time

import httpx
from asgiref.sync import sync_to_async
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import Connection

from tenants.redis import _packed_by_hiredis
from tests.perf.reporting import environment_markdown, markdown_table, report_write, run_environment, text_table

ROUNDS = 2_000


async def _turn(live) -> int:
    from config.asgi import application

    transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 5000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.localhost") as client:
        response = await client.post(
            "/v1/chat/completions",
            content=json.dumps(
                {
                    "model": live["bot"].public_id,
                    "stream": True,
                    "messages": [{"role": "user", "content": "How are refunds paid?"}],
                }
            ).encode(),
            headers={"Authorization": f"Bearer {live['raw']}", "Content-Type": "application/json"},
            timeout=30,
        )
    return response.status_code


def _recording(monkeypatch) -> list[list[tuple]]:
    """The arguments of every command of every pipeline executed from now on."""
    pipelines: list[list[tuple]] = []
    for name in ("_execute_pipeline", "_execute_transaction"):
        real = getattr(Pipeline, name)

        async def recorded(self, connection, commands, raise_on_error, _real=real):
            commands = list(commands)
            pipelines.append([args for args, _options in commands])
            return await _real(self, connection, commands, raise_on_error)

        monkeypatch.setattr(Pipeline, name, recorded)
    return pipelines


def _seconds_per_turn(connection, pipelines) -> float:
    started = time.perf_counter()
    for commands in pipelines:
        connection.pack_commands(commands)
    return time.perf_counter() - started


async def test_packing_a_turns_redis_commands(request, live, worker, django_db_blocker, monkeypatch):
    with django_db_blocker.unblock():
        environment = await sync_to_async(run_environment)(request.config)
        assert [await _turn(live) for _ in range(2)] == [200, 200]  # the key is known from here
        pipelines = _recording(monkeypatch)
        assert await _turn(live) == 200
        monkeypatch.undo()

    in_python, in_c = Connection(), _packed_by_hiredis(Connection)()
    for commands in pipelines:
        assert b"".join(in_c.pack_commands(commands)) == b"".join(in_python.pack_commands(commands))
    totals = {"python": 0.0, "hiredis": 0.0}
    for _ in range(ROUNDS):
        totals["python"] += _seconds_per_turn(in_python, pipelines)
        totals["hiredis"] += _seconds_per_turn(in_c, pipelines)
    per_turn_us = {name: round(seconds / ROUNDS * 1e6, 1) for name, seconds in totals.items()}
    commands = [args for pipeline in pipelines for args in pipeline]
    results = {
        "environment": environment,
        "pipelines": len(pipelines),
        "commands": len(commands),
        "arguments": sum(len(args) for args in commands),
        "bytes": sum(len(chunk) for pipeline in pipelines for chunk in in_c.pack_commands(pipeline)),
        "rounds": ROUNDS,
        "microseconds_per_turn": per_turn_us,
    }
    rows = [[name, value] for name, value in per_turn_us.items()]
    summary = (
        f"One streamed turn (a known key, the edge and a worker in process): {results['pipelines']} pipelines, "
        f"{results['commands']} commands, {results['arguments']} arguments, {results['bytes']:,} bytes; "
        f"packed {ROUNDS} times by each packer, interleaved. Python {per_turn_us['python']} µs per turn, "
        f"hiredis {per_turn_us['hiredis']} µs ({per_turn_us['python'] / max(per_turn_us['hiredis'], 0.1):.1f}x); "
        f"identical bytes."
    )
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            summary,
            markdown_table(["packer", "µs per turn"], rows),
        ]
    )
    print("\n" + summary + "\n" + text_table(["packer", "µs per turn"], rows))
    report_write(
        name="redis_packing",
        title="Packing a turn's Redis commands (asyncio client)",
        results=results,
        markdown=markdown,
    )
