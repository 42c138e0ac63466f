"""Open connections at scale: thousands of SSE clients held by one deployment on this machine,
some of them streaming answers from the mock at 20 tokens/s.

Processes: two daphne web processes, two generation workers (``run_generators``), the mock model
(``--tokens-per-second 20``, 60-token answers, no TTFT of its own, so a stream's time to first
token is Parley's overhead), and the client (``tests/perf/sse_load_client.py``, aiohttp, its own
process). Idle clients follow generations that never produce an event (a client waiting on a
queued or slow answer): ``GET /api/v1/generations/<id>/events/``; streaming clients post
``/v1/chat/completions`` with ``stream: true``. Each web process follows every client's stream
through its stream hub (chat.transports.hub): one pub/sub connection, not one Redis connection per
client.

Reported: connections opened and still open at the end, streams finished, time to first token and
gaps between text chunks (p50/p95/p99), memory per open connection (the web processes' RSS growth
while the idle connections opened, divided by their number), and the processes used.

Issue 7's target: 10,000 open, 1,000 of them streaming at 20 tokens/s, p95 gap < 100 ms, p95 TTFT
overhead < 50 ms, no dropped stream. ``PARLEY_BENCH_SSE_IDLE`` / ``PARLEY_BENCH_SSE_STREAMING``
change the numbers.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from django_tenants.utils import tenant_context

from chat.models import Bot
from chat.services import bot_create, bot_delete
from chat.streams import generation_owner_key
from tenants.models import ApiKey
from tenants.redis import get_redis
from tests.chat.live import BASE_DIR
from tests.factories import make_api_key
from tests.perf import chat_servers
from tests.perf.conftest import gateway_unlimited
from tests.perf.reporting import Distribution, environment_markdown, markdown_table, report_write, run_environment
from tests.perf.test_chat_throughput import _delete_conversations_of

IDLE = int(os.environ.get("PARLEY_BENCH_SSE_IDLE", "9000"))
STREAMING = int(os.environ.get("PARLEY_BENCH_SSE_STREAMING", "1000"))
WEB_PROCESSES = 2
GENERATOR_PROCESSES = 2
TOKENS_PER_SECOND = 20
# Streams start at a rate the web processes sustain on 2 cores (~25 turns/s: issue 3's throughput
# figures); to have ~1,000 streaming at once they last as long as the ramp: 800 tokens, 40 s.
ANSWER_TOKENS = 800
RAMP_SECONDS = 40.0
IDLE_OPEN_PER_SECOND = 100


@pytest.fixture
def sse_deployment(tenant_pair, django_db_blocker):
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    mock = chat_servers.mock_start(workers=2, tokens_per_second=TOKENS_PER_SECOND, answer_tokens=ANSWER_TOKENS)
    environment = chat_servers.parley_environment()
    groups: list[chat_servers.ServerGroup] = []
    with django_db_blocker.unblock():
        api_key, raw_key = make_api_key(tenant_pair.a, scopes=["chat"], name="open connections benchmark")
        limits = gateway_unlimited(tenant_pair.a, api_key)
        limits.__enter__()
        with tenant_context(tenant_pair.a):
            bot = bot_create(
                name="Open connections benchmark",
                provider_route=chat_servers.mock_route(mock),
            )
    try:
        groups.append(
            chat_servers.generators_start(processes=GENERATOR_PROCESSES, environment=environment, concurrency=1_000)
        )
        groups.append(chat_servers.parley_web_start("daphne", workers=WEB_PROCESSES, environment=environment))
        yield {"web": groups[-1], "generators": groups[0], "mock": mock, "bot": bot, "raw_key": raw_key, "key": api_key}
    finally:
        for group in [*groups, mock]:
            group.stop()
        with django_db_blocker.unblock():
            with tenant_context(tenant_pair.a):
                _delete_conversations_of(bot)
                bot_delete(bot=Bot.objects.get(pk=bot.pk))
            ApiKey.objects.filter(pk=api_key.pk).delete()
            limits.__exit__(None, None, None)


def _rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            total += process.memory_info().rss + sum(child.memory_info().rss for child in process.children(True))
        except psutil.NoSuchProcess:
            continue
    return total


def _distribution_row(name: str, samples: list[float]) -> list:
    if not samples:
        return [name, 0, "—", "—", "—", "—"]
    dist = Distribution.of(samples)
    return [name, dist.count, *(f"{value * 1e3:.1f}" for value in (dist.p50, dist.p90, dist.p99, dist.max))]


def test_open_sse_connections_at_scale(request, tenant_pair, django_db_blocker, sse_deployment):
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
    schema = tenant_pair.a.schema_name
    owner = json.dumps(
        {"conversation_id": "", "end_user_kind": "api", "end_user_id": f"key:{sse_deployment['key'].pk}"}
    )
    idle_generations = [str(uuid.uuid4()) for _ in range(IDLE)]
    redis = get_redis()
    with redis.pipeline(transaction=False) as pipe:
        for generation_id in idle_generations:
            pipe.set(generation_owner_key(schema, generation_id), owner, ex=3600)
        pipe.execute()
    web_pids = sse_deployment["web"].root_pids()
    rss_before = _rss(web_pids)
    with tempfile.TemporaryDirectory() as directory:
        config_path, result_path = Path(directory) / "config.json", Path(directory) / "result.json"
        config_path.write_text(
            json.dumps(
                {
                    "urls": sse_deployment["web"].urls,
                    "api_key": sse_deployment["raw_key"],
                    "model": sse_deployment["bot"].public_id,
                    "idle_generations": idle_generations,
                    "streaming": STREAMING,
                    "ramp_seconds": RAMP_SECONDS,
                    "idle_open_per_second": IDLE_OPEN_PER_SECOND,
                    "open_timeout_seconds": 240,
                    "stream_timeout_seconds": 180,
                }
            )
        )
        client = subprocess.Popen(
            [sys.executable, "-m", "tests.perf.sse_load_client", str(config_path), str(result_path)], cwd=BASE_DIR
        )
        peak_rss = rss_before
        while client.poll() is None:
            peak_rss = max(peak_rss, _rss(web_pids))
            time.sleep(0.5)
        assert client.returncode == 0
        result = json.loads(result_path.read_text())

    streams = result["streams"]
    finished = [stream for stream in streams if stream["done"] and not stream["error"]]
    ttfts = [stream["ttft"] for stream in finished if stream["ttft"] is not None]
    gaps = [gap for stream in finished for gap in stream["gaps"]]
    dropped = STREAMING - len(finished)
    errors = sorted({stream["error"] for stream in streams if stream["error"]})[:5]
    per_connection_kib = (peak_rss - rss_before) / max(1, result["idle_opened"] + STREAMING) / 1024
    gap_p95 = Distribution.of(gaps).p90 if gaps else float("nan")
    rows = [
        _distribution_row("time to first token (Parley's overhead: the mock has none)", ttfts),
        _distribution_row("gap between text chunks (nominal 50 ms)", gaps),
    ]
    p95 = {
        "ttft": sorted(ttfts)[int(0.95 * (len(ttfts) - 1))] if ttfts else None,
        "gap": sorted(gaps)[int(0.95 * (len(gaps) - 1))] if gaps else None,
    }
    markdown = "\n".join(
        [
            environment_markdown(environment),
            "",
            f"- Command: `make bench` (ran as `pytest {request.node.nodeid} -s`); {WEB_PROCESSES} daphne web "
            f"processes, {GENERATOR_PROCESSES} generation workers, the mock ({TOKENS_PER_SECOND} tokens/s, "
            f"{ANSWER_TOKENS}-token answers, 2 processes), one aiohttp client process; idle connections opened at "
            f"{IDLE_OPEN_PER_SECOND}/s, then streams started evenly over {RAMP_SECONDS:g} s.",
            f"- Idle connections: {result['idle_opened']:,} of {IDLE:,} opened in {result['open_seconds']:.1f} s, "
            f"{result['idle_still_open_at_end']:,} still open at the end, {result['idle_closed_by_server']} closed by "
            f"the server ({result['idle_failed_count']} failed to open"
            f"{': ' + ', '.join(result['idle_failed'][:3]) if result['idle_failed'] else ''}).",
            f"- Streams: {len(finished):,} of {STREAMING:,} finished with [DONE]; dropped or failed {dropped}"
            f"{' (' + '; '.join(errors) + ')' if errors else ''}.",
            f"- Memory: web processes {rss_before / 2**20:.0f} MiB before, {peak_rss / 2**20:.0f} MiB at peak: "
            f"{per_connection_kib:.1f} KiB per open connection.",
            "",
            markdown_table(["measure", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows),
            "",
            f"p95 TTFT overhead {p95['ttft'] * 1e3 if p95['ttft'] is not None else float('nan'):.1f} ms "
            "(target < 50 ms); p95 gap "
            f"{p95['gap'] * 1e3 if p95['gap'] is not None else float('nan'):.1f} ms (target < 100 ms); "
            f"dropped streams {dropped} (target 0).",
        ]
    )
    report_write(
        name=f"sse_scale_{IDLE + STREAMING}_{STREAMING}",
        title=f"Open SSE connections: {IDLE + STREAMING:,} open, {STREAMING:,} streaming",
        results={
            "idle": IDLE,
            "streaming": STREAMING,
            "idle_opened": result["idle_opened"],
            "idle_still_open_at_end": result["idle_still_open_at_end"],
            "finished": len(finished),
            "ttft_p95_ms": p95["ttft"] * 1e3 if p95["ttft"] is not None else None,
            "gap_p95_ms": p95["gap"] * 1e3 if p95["gap"] is not None else None,
            "gap_p90_ms": gap_p95 * 1e3,
            "kib_per_connection": per_connection_kib,
        },
        markdown=markdown,
    )
    print(markdown)
    assert result["idle_opened"] > 0
    assert finished
