"""Chat-engine throughput: ``POST /v1/chat/completions`` through the whole stack, against the
mock model at zero delay (20-token answers), side by side with the bare mock and LiteLLM's proxy.

Every system runs as real processes on loopback, started here:

- ``mock``: ``python -m chat.mock_server`` (2 processes) — the floor: what calling the model
  directly costs.
- ``litellm``: LiteLLM's proxy (PyPI ``litellm[proxy]``, 2 workers, master key, no database) in
  front of the same mock — the peer to beat. It lives in var/bench-venv (created here when missing;
  skipped, saying why, when that fails).
- ``parley-<server>``: Parley's ASGI app (``config.asgi:application``) under daphne, uvicorn
  (httptools, uvloop) and granian (uvloop), 2 web processes each, plus generation worker
  processes (``manage.py run_generators``) shared by the three. Each request authenticates an
  API key, resolves the tenant from it, validates the body, stores a conversation with its
  messages, hands the turn to a generation worker over the jobs stream, and relays the
  generation's Redis stream back (streamed) or waits for its end (not streamed); the worker
  loads the turn, calls the mock through the route (``"client": "aiohttp"``), publishes the
  tokens, stores the answer with its metrics. Production settings (PARLEY_ENV=production: a
  database connection pool per process, JSON request logs, Prometheus metrics), pointed at the
  bench database and Redis database.

Measured, in one run, scenario by scenario with the systems interleaved so that a busy neighbour
slows them alike: requests/s and latency at 50 and 200 connections, streamed and not
(``wrk``, every body checked), CPU per request of each system's processes (and of the shared
PostgreSQL and Redis servers); time to the first token, one request at a time; a py-spy profile
of Parley's web and generation processes; and the two ways of relaying tokens from worker to web
process (tests/perf/chat_relay.py). Benchmarks report; they assert nothing about timings.
"""

from __future__ import annotations

import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone
from django_tenants.utils import schema_context, tenant_context

from chat.models import Bot, Conversation, Message
from chat.services import bot_create, bot_delete
from chat.streams import JOBS_GROUP, JOBS_STREAM
from tenants.models import ApiKey
from tenants.redis import get_redis, tenant_key
from tests.factories import make_api_key
from tests.perf import chat_servers
from tests.perf.chat_load import (
    CpuMeter,
    LoadResult,
    Target,
    aiohttp_run,
    postgres_and_redis_pids,
    request_body,
    ttft_probe,
    wrk_available,
    wrk_path,
    wrk_run,
)
from tests.perf.chat_profile import Profile, Recorder
from tests.perf.chat_relay import channel_layer_relay, redis_stream_relay
from tests.perf.conftest import gateway_unlimited
from tests.perf.reporting import (
    Distribution,
    environment_markdown,
    markdown_table,
    report_write,
    run_environment,
    text_table,
)

ASGI_SERVERS = ("daphne", "uvicorn", "granian")
WEB_PROCESSES = 2  # per ASGI server; LiteLLM gets as many workers
# One: on these 2 cores a second worker process served fewer turns, not more (interleaved runs at
# 50 clients, streamed ~220 vs ~330 req/s: each process batched half as much per wake-up, and the
# two competed with the web processes for the cores). A turn needs no SQL in the worker; a
# deployment adds workers as it adds cores.
GENERATOR_PROCESSES = 1
MOCK_PROCESSES = 2
CONNECTIONS = (50, 200)
MEASURED_SECONDS = 7  # per scenario, after its ramp
# A system that shares itself among its clients answers its first ones after about its latency
# at that load: the ramp before the measured window is twice the latency expected (from the
# previous run of the same system and mode, scaled by the clients), within these bounds.
RAMP_SECONDS = (1.5, 12.0)
WARMUP_SECONDS = 4  # the first run of each system and mode: warms it up, gives the first latency
TTFT_ROUNDS = 150  # per system, one request at a time, systems interleaved
PROFILED_SERVER = "uvicorn"  # daphne when it is not installed
PROFILE_SECONDS = 8  # py-spy's run; the load's ramp and measured window fit inside it
PROFILE_RAMP_SECONDS = 2
PROFILE_CONNECTIONS = 50
RELAY_GENERATIONS = 50  # at once
RELAY_TOKENS = 100  # per generation
RELAY_ROUNDS = 2  # alternating the two mechanisms
DRAIN_TIMEOUT_SECONDS = 15
TARGET_RATIO = 10
TARGET_ADDED_TTFT_MS = 5.0


# --- fixtures ----------------------------------------------------------------------------------


# Function-scoped, every one: the suite's autouse fixture flushes the (bench) Redis database before
# each test, which would pull the job stream from under generation workers started earlier.


@pytest.fixture
def bench_tools() -> dict[str, Any]:
    return chat_servers.bench_venv_ensure()


@pytest.fixture
def mock_model():
    group = chat_servers.mock_start(workers=MOCK_PROCESSES)
    yield group
    group.stop()


@pytest.fixture
def parley_bot(tenant_pair, django_db_blocker, mock_model):
    """A committed bot routed to the mock with the lean aiohttp client, and a chat-scope API key.
    Removed afterwards with every conversation the benchmark stored, and its Redis streams."""
    with django_db_blocker.unblock():
        api_key, raw_key = make_api_key(tenant_pair.a, scopes=["chat"], name="chat throughput benchmark")
        with tenant_context(tenant_pair.a):
            bot = bot_create(
                name="Throughput benchmark",
                system_prompt="Answer briefly.",
                provider_route=chat_servers.mock_route(mock_model),
            )
        limits = gateway_unlimited(tenant_pair.a, api_key)
        limits.__enter__()
    yield {"bot": bot, "raw_key": raw_key, "schema": tenant_pair.a.schema_name}
    with django_db_blocker.unblock():
        limits.__exit__(None, None, None)
        with tenant_context(tenant_pair.a):
            _delete_conversations_of(bot)
            bot_delete(bot=Bot.objects.get(pk=bot.pk))
        ApiKey.objects.filter(pk=api_key.pk).delete()
    redis = get_redis()
    for batch in _batched(redis.scan_iter(match=tenant_key(tenant_pair.a.schema_name, "gen", "*"), count=1000)):
        redis.unlink(*batch)


def _delete_conversations_of(bot: Bot) -> None:
    """In two statements: the ORM's cascade would load every conversation (tens of thousands)."""
    message, conversation = Message._meta.db_table, Conversation._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {message} WHERE conversation_id IN (SELECT id FROM {conversation} WHERE bot_id = %s)",
            [bot.pk],
        )
        cursor.execute(f"DELETE FROM {conversation} WHERE bot_id = %s", [bot.pk])


def _batched(iterable, size: int = 1000):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@pytest.fixture
def systems(bench_tools, mock_model, parley_bot):
    """Every system under test, started (LiteLLM's slow start overlapping the others').

    Spawned from this thread: a child started from a short-lived thread would get the SIGTERM
    meant for the death of its parent when that thread ends (PR_SET_PDEATHSIG is per thread).
    """
    started: dict[str, chat_servers.ServerGroup] = {}
    skipped: dict[str, str] = {}
    litellm_key = ""
    environment = chat_servers.parley_environment()
    try:
        if isinstance(bench_tools["litellm"], str):
            skipped["litellm"] = bench_tools["litellm"]
        else:
            started["litellm"], litellm_key = chat_servers.litellm_spawn(
                bench_tools["litellm"], mock_url=mock_model.urls[0]
            )
        started["generators"] = chat_servers.generators_start(processes=GENERATOR_PROCESSES, environment=environment)
        started["flusher"] = chat_servers.flusher_start(environment=environment)
        for server in ASGI_SERVERS:
            if not chat_servers.web_server_installed(server):
                skipped[f"parley-{server}"] = f"{server} is not installed in {chat_servers.BIN.parent}"
                continue
            started[f"parley-{server}"] = chat_servers.parley_web_start(
                server, workers=WEB_PROCESSES, environment=environment
            )
        if "litellm" in started:
            try:
                chat_servers.litellm_wait(started["litellm"], workers=chat_servers.LITELLM_WORKERS)
            except RuntimeError as error:
                skipped["litellm"] = str(error)
                del started["litellm"]
    except BaseException:
        for group in started.values():
            group.stop()
        raise
    yield {"groups": started, "skipped": skipped, "litellm_key": litellm_key}
    for group in started.values():
        group.stop()


# --- helpers -----------------------------------------------------------------------------------


def _targets(systems, mock_model, parley_bot) -> list[tuple[Target, str]]:
    """(target, model) for every system that started, the bare mock first."""
    groups = systems["groups"]
    targets = [(Target("mock", mock_model.urls, {}), chat_servers.MOCK_MODEL)]
    if "litellm" in groups:
        bearer = {"Authorization": f"Bearer {systems['litellm_key']}"}
        targets.append((Target("litellm", groups["litellm"].urls, bearer), chat_servers.MOCK_MODEL))
    bearer = {"Authorization": f"Bearer {parley_bot['raw_key']}"}
    for server in ASGI_SERVERS:
        name = f"parley-{server}"
        if name in groups:
            targets.append((Target(name, groups[name].urls, bearer), parley_bot["bot"].public_id))
    return targets


def _is_parley(name: str) -> bool:
    return name.startswith("parley-")


def _drain_generations() -> None:
    """Until the generation workers have finished every turn of the last run (a client that wrk
    dropped at the deadline leaves its turn running), so that it does not load the next run."""
    redis = get_redis()
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        pending = redis.xpending(JOBS_STREAM, JOBS_GROUP)["pending"] if redis.exists(JOBS_STREAM) else 0
        if pending == 0 and redis.xlen(JOBS_STREAM) == 0:
            return
        time.sleep(0.1)


def _measure(
    target: Target,
    *,
    model: str,
    stream: bool,
    connections: int,
    ramp_s: float,
    measured_s: float,
    cpu_groups: dict[str, list[int]],
) -> dict:
    run = wrk_run if wrk_available() else aiohttp_run
    meter = CpuMeter(cpu_groups)
    result: LoadResult = run(
        target,
        body=request_body(stream=stream, model=model),
        stream=stream,
        connections=connections,
        warmup_s=ramp_s,
        measured_s=measured_s,
        meter=meter,
    )
    if _is_parley(target.name):
        _drain_generations()
    served = max(result.valid, 1)
    return {
        "system": target.name,
        "stream": stream,
        "connections": connections,
        "driver": result.driver,
        "ramp_seconds": round(ramp_s, 1),
        "measured_seconds": round(result.measured_s, 2),
        "requests": result.valid,
        "invalid": result.invalid,
        "requests_per_second": round(result.requests_per_second, 1),
        "latency_ms": {name: round(value * 1e3, 2) for name, value in result.latency_s.items()},
        "cpu_ms_per_request": {name: round(seconds * 1e3 / served, 3) for name, seconds in meter.seconds.items()},
        "driver_cpu_ms_per_request": round(result.driver_cpu_s * 1e3 / served, 3),
        "machine_busy_percent": round(meter.machine_busy_fraction * 100, 1),
    }


def _ramp(previous: dict, connections: int) -> float:
    """Twice the latency expected at ``connections`` clients, from a run at ``previous``'s."""
    expected = previous["latency_ms"]["mean"] / 1e3 * connections / previous["connections"]
    return min(max(2 * expected, RAMP_SECONDS[0]), RAMP_SECONDS[1])


def _cpu_groups(name: str, groups: dict[str, chat_servers.ServerGroup], shared: dict[str, list[int]]) -> dict:
    """The system's own processes (Parley's generation workers included), then the shared servers."""
    own = list(groups[name].root_pids()) if name in groups else []
    cpu = {"system": own}
    if _is_parley(name):
        cpu["web"] = own
        cpu["generators"] = groups["generators"].root_pids() + groups["flusher"].root_pids()
        cpu["system"] = own + cpu["generators"]
    cpu["postgres"] = shared["postgres"]
    cpu["redis"] = shared["redis"]
    return cpu


def _smoke(target: Target, model: str) -> None:
    """One answer through each system before any load: the setup works, or the test fails here."""
    response = httpx.post(
        target.urls[0].rstrip("/") + target.path,
        content=request_body(stream=False, model=model),
        headers={"Content-Type": "application/json", **target.headers},
        timeout=30,
    )
    assert response.status_code == 200, (target.name, response.status_code, response.text[:500])
    assert "fox" in response.json()["choices"][0]["message"]["content"], (target.name, response.text[:500])


def _profile_parley(systems, target: Target, model: str, py_spy) -> dict[str, Any]:
    """py-spy on every web process of one server and on the generation workers, under load."""
    groups = systems["groups"]
    web = groups[target.name]
    web_pids = [pid for pid in web.pids() if pid not in web.root_pids()] or web.root_pids()  # the workers
    generator_pids = groups["generators"].root_pids()
    profiles: dict[str, Any] = {}
    for stream in (False, True):
        recorders = {
            "web": Recorder(py_spy, web_pids, seconds=PROFILE_SECONDS),
            "generators": Recorder(py_spy, generator_pids, seconds=PROFILE_SECONDS),
        }
        time.sleep(0.5)  # py-spy attaches
        meter = CpuMeter({"web": web.root_pids(), "generators": generator_pids})
        result = (wrk_run if wrk_available() else aiohttp_run)(
            target,
            body=request_body(stream=stream, model=model),
            stream=stream,
            connections=PROFILE_CONNECTIONS,
            warmup_s=PROFILE_RAMP_SECONDS,
            measured_s=PROFILE_SECONDS - PROFILE_RAMP_SECONDS - 1,
            meter=meter,
        )
        _drain_generations()
        served = max(result.valid, 1)
        mode = "stream" if stream else "non_stream"
        for side, recorder in recorders.items():
            profile: Profile = recorder.result()
            profiles[f"{mode}.{side}"] = {
                "system": target.name,
                "requests_per_second": round(result.requests_per_second, 1),
                "cpu_ms_per_request": round(meter.seconds[side] * 1e3 / served, 3),
                **profile.as_dict(),
            }
    return profiles


def _relay_benchmark() -> list[dict[str, Any]]:
    redis_url = settings.REDIS_URL
    runs = {"redis_stream": [], "channel_layer": []}
    for _ in range(RELAY_ROUNDS):
        runs["redis_stream"].append(redis_stream_relay(redis_url, generations=RELAY_GENERATIONS, tokens=RELAY_TOKENS))
        runs["channel_layer"].append(channel_layer_relay(redis_url, generations=RELAY_GENERATIONS, tokens=RELAY_TOKENS))
    rows = []
    for mechanism, results in runs.items():
        best = max(results, key=lambda result: result.events_per_second)
        rows.append(
            {
                "mechanism": mechanism,
                "events": best.events,
                "events_per_second": round(best.events_per_second),
                "publisher_cpu_us_per_event": round(best.cpu_us_per_event("publisher"), 1),
                "reader_cpu_us_per_event": round(best.cpu_us_per_event("reader"), 1),
                "redis_cpu_us_per_event": round(best.cpu_us_per_event("redis"), 1),
                "lost": sum(result.lost for result in results),
                "rounds_events_per_second": [round(result.events_per_second) for result in results],
            }
        )
    return rows


def _versions(bench_tools) -> dict[str, str]:
    versions = {}
    for name in ("daphne", "uvicorn", "granian", "uvloop", "httptools", "channels_redis"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    versions["django"] = version("django")
    if not isinstance(bench_tools.get("litellm"), str):
        versions["litellm"] = chat_servers.bench_venv_version("litellm")
    if wrk_available():
        completed = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True, check=False)
        versions["wrk"] = (completed.stdout or completed.stderr).split()[1]
    return versions


# --- the benchmark -----------------------------------------------------------------------------


def test_chat_throughput(request, django_db_blocker, bench_tools, mock_model, parley_bot, systems):
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
    started = time.monotonic()
    groups = {**systems["groups"], "mock": mock_model}
    shared = postgres_and_redis_pids()
    targets = _targets(systems, mock_model, parley_bot)
    for target, model in targets:
        _smoke(target, model)

    latest: dict[tuple[str, bool], dict] = {}  # each system's and mode's last run, for the next ramp
    for target, model in targets:  # warm-up: connection pools, route caches, first imports
        for stream in (False, True):
            latest[target.name, stream] = _measure(
                target,
                model=model,
                stream=stream,
                connections=CONNECTIONS[0],
                ramp_s=0,
                measured_s=WARMUP_SECONDS,
                cpu_groups=_cpu_groups(target.name, groups, shared),
            )

    throughput = []
    for stream in (False, True):
        for connections in CONNECTIONS:
            for target, model in targets:
                row = _measure(
                    target,
                    model=model,
                    stream=stream,
                    connections=connections,
                    ramp_s=_ramp(latest[target.name, stream], connections),
                    measured_s=MEASURED_SECONDS,
                    cpu_groups=_cpu_groups(target.name, groups, shared),
                )
                latest[target.name, stream] = row
                throughput.append(row)
                print(
                    f"  {target.name:<16} {'stream' if stream else 'json':<6} c={connections:<4}"
                    f"{row['requests_per_second']:>9.1f} req/s  p50 {row['latency_ms']['p50']:>8.2f} ms"
                    f"  p99 {row['latency_ms']['p99']:>8.2f} ms  invalid {row['invalid']}"
                    f"  (ramp {row['ramp_seconds']} s)",
                    flush=True,
                )

    probe_started = timezone.now()
    samples = ttft_probe(
        [target for target, _model in targets],
        bodies={target.name: request_body(stream=True, model=model) for target, model in targets},
        rounds=TTFT_ROUNDS,
    )
    with django_db_blocker.unblock(), schema_context(parley_bot["schema"]):
        worker_ttft = [
            value / 1e3
            for value in Message.objects.filter(
                conversation__bot_id=parley_bot["bot"].pk,
                role=Message.Role.ASSISTANT,
                created_at__gte=probe_started,
                ttft_ms__isnull=False,
            ).values_list("ttft_ms", flat=True)
        ]
    ttft = {}
    for name, sample in samples.items():
        ttft[name] = {
            "first_token_ms": Distribution.of(sample.first_token_s).as_dict(unit="ms")
            if sample.first_token_s
            else None,
            "total_ms": Distribution.of(sample.total_s).as_dict(unit="ms") if sample.total_s else None,
            "invalid": sample.invalid,
        }

    profiles: dict[str, Any] = {}
    profile_skipped = ""
    if isinstance(bench_tools["py-spy"], str):
        profile_skipped = bench_tools["py-spy"]
    else:
        names = {target.name for target, _model in targets}
        profiled_name = f"parley-{PROFILED_SERVER}" if f"parley-{PROFILED_SERVER}" in names else "parley-daphne"
        profiled = next((target, model) for target, model in targets if target.name == profiled_name)
        profiles = _profile_parley(systems, *profiled, bench_tools["py-spy"])

    relay = _relay_benchmark()

    results = {
        "environment": environment,
        "setup": {
            "web_processes": WEB_PROCESSES,
            "generator_processes": GENERATOR_PROCESSES,
            "litellm_workers": chat_servers.LITELLM_WORKERS,
            "mock_processes": MOCK_PROCESSES,
            "measured_seconds": MEASURED_SECONDS,
            "ramp_seconds": list(RAMP_SECONDS),
            "answer_tokens": 20,
            "driver": "wrk" if wrk_available() else "aiohttp",
            "versions": _versions(bench_tools),
            "skipped": {**systems["skipped"], **({"profile": profile_skipped} if profile_skipped else {})},
        },
        "throughput": throughput,
        "ttft": ttft,
        # From the turn's start in a generation worker (loading it, retrieval, the model call) to
        # its first token, as stored on the answers of the TTFT probe's Parley requests.
        "worker_ttft_ms": Distribution.of(worker_ttft).as_dict(unit="ms") if worker_ttft else None,
        "server_errors": {
            name: [{"error": error, "count": count} for error, count in group.errors()]
            for name, group in systems["groups"].items()
        },
        "profile": profiles,
        "relay": relay,
        "summary": _summary(throughput, ttft),
        "bench_seconds": round(time.monotonic() - started),
    }
    markdown = _markdown(results)
    path = report_write(
        name="chat_throughput",
        title="Chat engine: /v1/chat/completions vs LiteLLM and the bare mock",
        results=results,
        markdown=markdown,
    )
    print("\n" + _text(results) + f"\n\nWritten: {path}")


# --- report ------------------------------------------------------------------------------------

_MODES = ((False, "non-streamed"), (True, "streamed"))


def _row_of(throughput: list[dict], system: str, stream: bool, connections: int) -> dict | None:
    return next(
        (
            row
            for row in throughput
            if row["system"] == system and row["stream"] == stream and row["connections"] == connections
        ),
        None,
    )


def _summary(throughput: list[dict], ttft: dict) -> dict[str, Any]:
    ratios = {}
    for stream, mode in _MODES:
        for connections in CONNECTIONS:
            parley = [
                row
                for row in throughput
                if _is_parley(row["system"]) and row["stream"] == stream and row["connections"] == connections
            ]
            best = max(parley, key=lambda row: row["requests_per_second"])
            litellm = _row_of(throughput, "litellm", stream, connections)
            mock = _row_of(throughput, "mock", stream, connections)
            ratios[f"{mode}@{connections}"] = {
                "best_parley_system": best["system"],
                "best_parley_requests_per_second": best["requests_per_second"],
                "litellm_requests_per_second": litellm["requests_per_second"] if litellm else None,
                "ratio_vs_litellm": round(best["requests_per_second"] / litellm["requests_per_second"], 2)
                if litellm and litellm["requests_per_second"]
                else None,
                "share_of_bare_mock": round(best["requests_per_second"] / mock["requests_per_second"], 4)
                if mock and mock["requests_per_second"]
                else None,
            }
    mock_p50 = (ttft.get("mock") or {}).get("first_token_ms") or {}
    added = {
        name: round(figures["first_token_ms"]["p50"] - mock_p50["p50"], 2)
        for name, figures in ttft.items()
        if name != "mock" and figures["first_token_ms"] and mock_p50
    }
    return {
        "ratio_vs_litellm": ratios,
        "added_ttft_p50_ms": added,
        "targets": {"ratio_vs_litellm": TARGET_RATIO, "added_ttft_p50_ms": TARGET_ADDED_TTFT_MS},
    }


def _throughput_rows(results: dict) -> list[list[Any]]:
    rows = []
    for row in results["throughput"]:
        litellm = _row_of(results["throughput"], "litellm", row["stream"], row["connections"])
        ratio = (
            f"{row['requests_per_second'] / litellm['requests_per_second']:.2f}"
            if litellm and litellm["requests_per_second"] and row["system"] != "litellm"
            else ""
        )
        cpu = row["cpu_ms_per_request"]
        rows.append(
            [
                row["system"],
                "stream" if row["stream"] else "json",
                row["connections"],
                f"{row['requests_per_second']:,.1f}",
                f"{row['latency_ms']['p50']:.2f}",
                f"{row['latency_ms']['p99']:.2f}",
                row["invalid"],
                f"{cpu['system']:.2f}",
                f"{cpu['generators']:.2f}" if "generators" in cpu else "",
                f"{cpu['postgres']:.2f}",
                f"{cpu['redis']:.2f}",
                f"{row['machine_busy_percent']:.0f}",
                ratio,
            ]
        )
    return rows


_THROUGHPUT_HEADERS = [
    "system",
    "answer",
    "clients",
    "req/s",
    "p50 ms",
    "p99 ms",
    "invalid",
    "CPU ms/req",
    "of it, generators",
    "PostgreSQL ms/req",
    "Redis ms/req",
    "machine busy %",
    "x LiteLLM",
]
_TTFT_HEADERS = [
    "system",
    "TTFT p50 ms",
    "p90 ms",
    "p99 ms",
    "added p50 ms (vs mock)",
    "whole answer p50 ms",
    "invalid",
]
_RELAY_HEADERS = [
    "mechanism",
    "events",
    "events/s",
    "publisher CPU µs/event",
    "reader CPU µs/event",
    "Redis CPU µs/event",
    "lost",
]


def _ttft_rows(results: dict) -> list[list[Any]]:
    added = results["summary"]["added_ttft_p50_ms"]
    rows = []
    for name, figures in results["ttft"].items():
        first, total = figures["first_token_ms"], figures["total_ms"]
        if first is None:
            rows.append([name, "", "", "", "", "", figures["invalid"]])
            continue
        rows.append(
            [
                name,
                f"{first['p50']:.2f}",
                f"{first['p90']:.2f}",
                f"{first['p99']:.2f}",
                f"{added[name]:.2f}" if name in added else "0.00",
                f"{total['p50']:.2f}",
                figures["invalid"],
            ]
        )
    return rows


def _relay_rows(results: dict) -> list[list[Any]]:
    return [
        [
            row["mechanism"],
            row["events"],
            f"{row['events_per_second']:,}",
            f"{row['publisher_cpu_us_per_event']:.1f}",
            f"{row['reader_cpu_us_per_event']:.1f}",
            f"{row['redis_cpu_us_per_event']:.1f}",
            row["lost"],
        ]
        for row in results["relay"]
    ]


def _profile_rows(profile: dict, key: str) -> list[list[Any]]:
    cpu = profile["cpu_ms_per_request"]
    return [
        [entry["name"], f"{entry['share'] * 100:.1f}", f"{entry['share'] * cpu:.3f}"] for entry in profile[key][:10]
    ]


def _summary_lines(results: dict) -> list[str]:
    lines = []
    for label, figures in results["summary"]["ratio_vs_litellm"].items():
        ratio = figures["ratio_vs_litellm"]
        lines.append(
            f"- {label} clients: best Parley {figures['best_parley_system']} "
            f"{figures['best_parley_requests_per_second']:,.1f} req/s"
            + (
                f" = {ratio:.2f}x LiteLLM ({figures['litellm_requests_per_second']:,.1f}); target {TARGET_RATIO}x: "
                + ("met" if ratio >= TARGET_RATIO else "not met")
                if ratio is not None
                else " (LiteLLM not measured)"
            )
            + (
                f"; {figures['share_of_bare_mock'] * 100:.1f}% of the bare mock"
                if figures["share_of_bare_mock"]
                else ""
            )
        )
    for name, added in results["summary"]["added_ttft_p50_ms"].items():
        verdict = "met" if added < TARGET_ADDED_TTFT_MS else "not met"
        lines.append(f"- TTFT added at p50 by {name}: {added:.2f} ms (target < {TARGET_ADDED_TTFT_MS:g} ms: {verdict})")
    return lines


def _setup_text(results: dict) -> str:
    setup = results["setup"]
    versions = ", ".join(f"{name} {value}" for name, value in setup["versions"].items())
    skipped = "".join(f"\n- Skipped {name}: {why}" for name, why in setup["skipped"].items())
    return (
        f"Mock at zero delay, {setup['answer_tokens']}-token answers, {setup['mock_processes']} processes. "
        f"Parley: {setup['web_processes']} web processes per ASGI server + {setup['generator_processes']} "
        f"generation worker process{'es' if setup['generator_processes'] != 1 else ''}, production settings; "
        f"LiteLLM: {setup['litellm_workers']} workers. "
        f"Load: {setup['driver']}, closed loop, 2 threads; per scenario a ramp (twice the latency expected, "
        f"{setup['ramp_seconds'][0]:g}-{setup['ramp_seconds'][1]:g} s), then {setup['measured_seconds']} s measured: "
        f"req/s and CPU over the measured window, latency over the whole run; every body checked (200, the "
        f"answer's text, its end marker, no error). CPU ms/req: the system's own "
        f"processes (Parley's generation workers included) per answered request; PostgreSQL and Redis are "
        f"shared servers (anything else running counts too). Versions: {versions}.{skipped}"
    )


def _ttft_split_lines(results: dict) -> list[str]:
    worker = results["worker_ttft_ms"]
    if worker is None:
        return []
    parley = [
        figures["first_token_ms"]["p50"]
        for name, figures in results["ttft"].items()
        if _is_parley(name) and figures["first_token_ms"]
    ]
    lines = [
        f"Of Parley's time to first token, the generation worker's part (turn start → first token: loading the "
        f"turn, retrieval, the model call; stored on each answer) is p50 {worker['p50']:.2f} ms, p90 "
        f"{worker['p90']:.2f} ms over {worker['count']} answers"
    ]
    if parley:
        lines[0] += (
            f"; the rest — web request, storing the exchange, the job queue, relaying the first token — is about "
            f"{min(parley) - worker['p50']:.1f} ms at p50 (difference of medians)."
        )
    return [*lines, ""]


def _error_lines(results: dict) -> list[str]:
    lines = []
    for name, errors in results["server_errors"].items():
        for entry in errors:
            lines.append(f"- {name} log: {entry['count']} x `{entry['error']}`")
    if not lines:
        return []
    return ["Errors in the servers' logs over the whole run (why answers were invalid):", "", *lines, ""]


def _markdown(results: dict) -> str:
    parts = [
        environment_markdown(results["environment"]),
        "",
        _setup_text(results),
        "",
        *_summary_lines(results),
        "",
        markdown_table(_THROUGHPUT_HEADERS, _throughput_rows(results)),
        "",
        "Time to first token (first chunk carrying text), one streamed request at a time, systems interleaved:",
        "",
        markdown_table(_TTFT_HEADERS, _ttft_rows(results)),
        "",
        *_ttft_split_lines(results),
        *_error_lines(results),
        f"Relaying tokens worker → web process ({RELAY_GENERATIONS} generations at once x {RELAY_TOKENS} tokens, "
        f"best of {RELAY_ROUNDS} alternating rounds; each side on its own event loop and thread):",
        "",
        markdown_table(_RELAY_HEADERS, _relay_rows(results)),
    ]
    for name, profile in results["profile"].items():
        parts += [
            "",
            f"Profile `{name}` ({profile['system']}, {PROFILE_CONNECTIONS} clients, "
            f"{profile['requests_per_second']:,.1f} req/s under py-spy; {profile['cpu_ms_per_request']:.2f} ms CPU "
            f"per request, {profile['samples']} samples): self time by component, and project functions inclusive",
            "",
            markdown_table(["component (self)", "% of samples", "ms/req"], _profile_rows(profile, "self_by_component")),
            "",
            markdown_table(
                ["project function (inclusive)", "% of samples", "ms/req"],
                _profile_rows(profile, "top_project_inclusive"),
            ),
        ]
    parts += ["", f"Whole benchmark: {results['bench_seconds']} s."]
    return "\n".join(parts)


def _text(results: dict) -> str:
    parts = [
        *_summary_lines(results),
        "",
        text_table(_THROUGHPUT_HEADERS, _throughput_rows(results)),
        "",
        text_table(_TTFT_HEADERS, _ttft_rows(results)),
        *_ttft_split_lines(results),
        *_error_lines(results),
        text_table(_RELAY_HEADERS, _relay_rows(results)),
    ]
    for name, profile in results["profile"].items():
        parts += [
            "",
            f"{name}: {profile['cpu_ms_per_request']:.2f} ms CPU/request",
            text_table(["component (self)", "%", "ms/req"], _profile_rows(profile, "self_by_component")),
            text_table(
                ["project function (inclusive)", "%", "ms/req"], _profile_rows(profile, "top_project_inclusive")
            ),
        ]
    return "\n".join(parts)
