"""Client side of the open-connections benchmark, run as its own process (no Django here):

    python -m tests.perf.sse_load_client CONFIG.json RESULT.json

It opens ``idle`` SSE connections (``GET /api/v1/generations/<id>/events/`` of generations that
never produce an event: clients waiting on a slow or queued answer), spread over the web
processes' URLs, keeps them open, then starts ``streaming`` streamed ``/v1/chat/completions``
requests spread over ``ramp_seconds``, and records per stream the time to the first answer text,
the gaps between chunks carrying text, and whether it ended with ``[DONE]``. At the end it checks
that the idle connections are all still open.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import aiohttp


async def _idle(
    session, url: str, headers: dict, opened: list, failed: list, closed: list, stop: asyncio.Event
) -> None:
    try:
        async with session.get(url, headers=headers) as response:
            if response.status != 200:
                failed.append(f"status {response.status}")
                return
            opened.append(1)
            reader = asyncio.create_task(response.content.read())  # returns when the server closes
            stopper = asyncio.create_task(stop.wait())
            done, _pending = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                closed.append(1)  # the server ended a stream that should have stayed open
            reader.cancel()
            stopper.cancel()
    except (aiohttp.ClientError, TimeoutError) as error:
        failed.append(type(error).__name__)


async def _stream(session, url: str, headers: dict, body: bytes, results: list) -> None:
    started = time.perf_counter()
    first = None
    arrivals: list[float] = []
    is_done = False
    error = ""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            if response.status != 200:
                error = f"status {response.status}"
            else:
                async for line in response.content:
                    if line.startswith(b"data: [DONE]"):
                        is_done = True
                        break
                    if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                        now = time.perf_counter()
                        arrivals.append(now)
                        if first is None:
                            first = now
                    elif line.startswith(b'data: {"error"'):
                        error = line[:200].decode(errors="replace")
    except (aiohttp.ClientError, TimeoutError) as caught:
        error = type(caught).__name__
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    results.append(
        {
            "ttft": (first - started) if first is not None else None,
            "gaps": gaps,
            "chunks": len(arrivals),
            "done": is_done,
            "error": error,
        }
    )


async def run(config: dict) -> dict:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=None)
    headers = {"Authorization": f"Bearer {config['api_key']}", "Accept": "text/event-stream"}
    stop = asyncio.Event()
    opened: list = []
    idle_failed: list = []
    idle_closed: list = []
    results: list = []
    urls = config["urls"]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        idle_tasks = []
        for index, generation_id in enumerate(config["idle_generations"]):
            url = f"{urls[index % len(urls)]}/api/v1/generations/{generation_id}/events/"
            idle_tasks.append(asyncio.create_task(_idle(session, url, headers, opened, idle_failed, idle_closed, stop)))
            if index % 20 == 19:  # a bounded pace: each opening is a request to a sync view
                await asyncio.sleep(20 / config["idle_open_per_second"])
        deadline = time.monotonic() + config["open_timeout_seconds"]
        while len(opened) + len(idle_failed) < len(idle_tasks) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)  # polling counters several thousand tasks append to
        open_seconds = time.perf_counter() - started
        await asyncio.sleep(1.0)
        body = json.dumps(
            {
                "model": config["model"],
                "stream": True,
                "messages": [{"role": "user", "content": "Tell me about refunds."}],
            }
        ).encode()
        post_headers = {**headers, "Content-Type": "application/json", "Accept": "application/json"}
        stream_tasks = []
        spacing = config["ramp_seconds"] / max(1, config["streaming"])
        for index in range(config["streaming"]):
            url = f"{urls[index % len(urls)]}/v1/chat/completions"
            stream_tasks.append(asyncio.create_task(_stream(session, url, post_headers, body, results)))
            await asyncio.sleep(spacing)
        await asyncio.wait(stream_tasks, timeout=config["stream_timeout_seconds"])
        still_open = len(opened) - len(idle_closed)
        stop.set()
        await asyncio.gather(*idle_tasks, return_exceptions=True)
    return {
        "idle_requested": len(config["idle_generations"]),
        "idle_opened": len(opened),
        "idle_failed": idle_failed[:20],
        "idle_failed_count": len(idle_failed),
        "idle_still_open_at_end": still_open,
        "idle_closed_by_server": len(idle_closed),
        "open_seconds": open_seconds,
        "streams": results,
        "streams_unfinished": config["streaming"] - len(results),
    }


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(config))
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
