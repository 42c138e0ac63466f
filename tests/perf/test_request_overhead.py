"""What tenant resolution + API-key authentication add to a request (target: < 1 ms at p50).

Measured in-process through the real ASGI application (``config.asgi.application``) with
``httpx.AsyncClient(transport=httpx.ASGITransport(...))``: Django's ASGI handler, its thread hop,
every middleware and DRF run as under daphne; only the socket and HTTP parsing are left out, and
they would cost every variant the same. Each request runs in a task of its own with a fresh
context, as an ASGI server runs them: one context reused across requests would let Django carry
state from one request to the next (its cache handles) that production does not carry.
Variants are interleaved request by request, so a busy neighbour slows them all alike.

- ``healthz``: ``/healthz``, answered by the first middleware: client + ASGI floor.
- ``bare`` (the baseline): the same ASGI stack with do-nothing, equally sync-only stand-ins in
  place of the two tenant middlewares (see tests/perf/baseline.py), serving a DRF view that
  returns what /me returns, with no authentication or permission check.
- ``public``: the real application, the same bare view, no credential: the host lookup that every
  request pays, then the public schema.
- ``api_key``: the real application, ``GET /api/v1/me/`` with a real key: host lookup, key-prefix
  lookup (Redis), HMAC verification, the last-used throttle, the scope permission.

Added cost = ``api_key`` minus ``bare``, as a difference of percentiles.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from channels.routing import ProtocolTypeRouter
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db.backends.signals import connection_created
from django.test import override_settings

from tenants.redis import get_redis
from tenants.resolution import api_key_resolve, tenant_resolve_by_host
from tenants.services import api_key_hash, api_key_parse_prefix
from tests.factories import host_of
from tests.perf.baseline import BARE_PATH, STAND_IN_MIDDLEWARE, TENANT_MIDDLEWARE, baseline_middleware
from tests.perf.reporting import (
    Distribution,
    environment_markdown,
    format_duration,
    markdown_table,
    report_write,
    run_environment,
    text_table,
)

REQUESTS_PER_VARIANT = 2000
WARMUP_REQUESTS_PER_VARIANT = 100
COUNTED_REQUESTS_PER_VARIANT = 30  # a separate, untimed pass that counts database and Redis work
FUNCTION_CALLS = 1000
FUNCTION_WARMUP_CALLS = 200
BENCH_URLCONF = "tests.perf.baseline"


VARIANT_DESCRIPTIONS = {
    "healthz": "GET /healthz (first middleware answers)",
    "bare": "bare view, tenant middleware stood in for (baseline)",
    "public": "bare view, full stack, no credential",
    "api_key": "GET /api/v1/me/ with an API key, full stack",
}


@dataclass(frozen=True)
class Variant:
    name: str
    client: httpx.AsyncClient
    path: str
    headers: dict[str, str]


def _bare_application() -> ProtocolTypeRouter:
    """config.asgi.application's HTTP side, with do-nothing stand-ins for the tenant middlewares."""
    middleware = baseline_middleware(settings.MIDDLEWARE)
    assert middleware.count(STAND_IN_MIDDLEWARE) == len(TENANT_MIDDLEWARE)
    with override_settings(MIDDLEWARE=middleware):
        return ProtocolTypeRouter({"http": ASGIHandler()})


async def _get(variant: Variant) -> httpx.Response:
    # A task of its own with an empty context: what daphne/uvicorn give every request.
    return await asyncio.create_task(
        variant.client.get(variant.path, headers=variant.headers), context=contextvars.Context()
    )


async def _interleaved(variants: list[Variant], rounds: int) -> tuple[dict[str, list[float]], Counter]:
    samples: dict[str, list[float]] = {variant.name: [] for variant in variants}
    statuses: Counter = Counter()
    for round_number in range(rounds):
        shift = round_number % len(variants)  # rotate the order so that none always goes first
        for variant in variants[shift:] + variants[:shift]:
            started = time.perf_counter()
            response = await _get(variant)
            samples[variant.name].append(time.perf_counter() - started)
            statuses[(variant.name, response.status_code)] += 1
    return samples, statuses


@contextmanager
def _counting_io(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts Redis connections and commands, database connections and queries, in every thread."""
    counts: Counter = Counter()
    connect = redis.connection.Connection._connect
    execute_command = redis.Redis.execute_command

    def counting_connect(self, *args, **kwargs):
        counts["redis_connections"] += 1
        return connect(self, *args, **kwargs)

    def counting_execute_command(self, *args, **options):
        counts["redis_commands"] += 1
        counts[f"redis:{args[0]}"] += 1
        return execute_command(self, *args, **options)

    def counting_query(execute, sql, params, many, context):
        counts["db_queries"] += 1
        return execute(sql, params, many, context)

    def on_connection_created(sender, connection, **kwargs):
        counts["db_connections"] += 1
        connection.execute_wrappers.append(counting_query)

    with monkeypatch.context() as patch:
        patch.setattr(redis.connection.Connection, "_connect", counting_connect)
        patch.setattr(redis.Redis, "execute_command", counting_execute_command)
        connection_created.connect(on_connection_created, weak=False)
        try:
            yield counts
        finally:
            connection_created.disconnect(on_connection_created)


async def _counted(variants: list[Variant], monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, float]]:
    per_request = {}
    for variant in variants:
        with _counting_io(monkeypatch) as counts:
            for _ in range(COUNTED_REQUESTS_PER_VARIANT):
                await _get(variant)
        per_request[variant.name] = {
            name: round(count / COUNTED_REQUESTS_PER_VARIANT, 2) for name, count in sorted(counts.items())
        }
    return per_request


def test_request_overhead_of_tenant_resolution_and_api_key_auth(
    tenant_pair, bench_api_key, django_db_blocker, monkeypatch, request
):
    api_key, raw_key = bench_api_key
    with override_settings(ROOT_URLCONF=BENCH_URLCONF, PUBLIC_SCHEMA_URLCONF=BENCH_URLCONF):
        from config.asgi import application

        bare_application = _bare_application()

        async def run() -> tuple[dict[str, list[float]], Counter, dict[str, Any], dict[str, dict[str, float]]]:
            transport = httpx.ASGITransport(app=application)
            bare_transport = httpx.ASGITransport(app=bare_application)
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://localhost") as client,
                httpx.AsyncClient(transport=bare_transport, base_url="http://localhost") as bare_client,
            ):
                variants = [
                    Variant("healthz", client, "/healthz", {}),
                    Variant("bare", bare_client, BARE_PATH, {}),
                    Variant("public", client, BARE_PATH, {}),
                    Variant("api_key", client, "/api/v1/me/", {"Authorization": f"Bearer {raw_key}"}),
                ]
                me = (await _get(variants[-1])).json()
                bare = (await _get(variants[1])).json()
                await _interleaved(variants, WARMUP_REQUESTS_PER_VARIANT)
                samples, statuses = await _interleaved(variants, REQUESTS_PER_VARIANT)
                per_request = await _counted(variants, monkeypatch)
            return samples, statuses, {"me": me, "bare": bare}, per_request

        with django_db_blocker.unblock():
            environment = run_environment(request.config)
            samples, statuses, bodies, per_request = asyncio.run(run())

    assert bodies["me"] == {**bodies["bare"], "api_key_id": api_key.pk}
    assert bodies["me"]["tenant"] == tenant_pair.a.slug
    assert statuses == Counter({(name, 200): REQUESTS_PER_VARIANT for name in samples})

    distributions = {name: Distribution.of(values) for name, values in samples.items()}
    baseline, public, keyed = distributions["bare"], distributions["public"], distributions["api_key"]
    added = {
        "resolution + API-key auth (api_key - bare)": (keyed.p50 - baseline.p50, keyed.p99 - baseline.p99),
        "host lookup only (public - bare)": (public.p50 - baseline.p50, public.p99 - baseline.p99),
        "key lookup + auth (api_key - public)": (keyed.p50 - public.p50, keyed.p99 - public.p99),
    }
    variant_rows = [
        [
            name,
            VARIANT_DESCRIPTIONS[name],
            *(format_duration(getattr(d, f), "ms") for f in ("p50", "p90", "p99", "max")),
        ]
        for name, d in distributions.items()
    ]
    variant_headers = ["variant", "what", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    added_rows = [
        [label, format_duration(p50, "ms"), format_duration(p99, "ms")] for label, (p50, p99) in added.items()
    ]
    added_headers = ["added cost", "p50 ms", "p99 ms"]
    io_names = ["db_connections", "db_queries", "redis_connections", "redis_commands"]
    io_rows = [
        [name, *(counts.get(column, 0) for column in io_names), _redis_command_mix(counts)]
        for name, counts in per_request.items()
    ]
    io_headers = ["variant", "DB connections", "DB queries", "Redis connections", "Redis commands", "Redis mix"]

    print(
        f"\nRequest overhead: {REQUESTS_PER_VARIANT} requests per variant, interleaved, after "
        f"{WARMUP_REQUESTS_PER_VARIANT} warm-up requests each (in-process ASGI, httpx.ASGITransport)"
    )
    print(text_table(variant_headers, variant_rows))
    print()
    print(text_table(added_headers, added_rows))
    print(f"\nWork per request (mean of {COUNTED_REQUESTS_PER_VARIANT} untimed requests each):")
    print(text_table(io_headers, io_rows))

    results = {
        "environment": environment,
        "method": {
            "transport": "httpx.AsyncClient + httpx.ASGITransport into config.asgi.application, in-process",
            "requests_per_variant": REQUESTS_PER_VARIANT,
            "warmup_requests_per_variant": WARMUP_REQUESTS_PER_VARIANT,
            "order": "interleaved, rotated each round",
            "context": "each request in its own task with an empty contextvars.Context, as ASGI servers do",
            "added": "difference of percentiles (variant p - baseline p), not percentiles of differences",
        },
        "variants": {
            name: {"description": VARIANT_DESCRIPTIONS[name], "ms": d.as_dict(unit="ms")}
            for name, d in distributions.items()
        },
        "added_ms": {
            label: {"p50": round(p50 * 1e3, 3), "p99": round(p99 * 1e3, 3)} for label, (p50, p99) in added.items()
        },
        "target_ms": {"added_p50": 1.0},
        "per_request": per_request,
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            f"{REQUESTS_PER_VARIANT} sequential requests per variant, interleaved, after "
            f"{WARMUP_REQUESTS_PER_VARIANT} warm-up requests each; in-process through `config.asgi.application` "
            "with `httpx.ASGITransport`, each request in a fresh task context as an ASGI server runs it. "
            "Target: resolution + API-key auth adds < 1 ms at p50.",
            markdown_table(variant_headers, variant_rows),
            markdown_table(added_headers, added_rows),
            f"Work per request (mean of {COUNTED_REQUESTS_PER_VARIANT} untimed requests per variant):",
            markdown_table(io_headers, io_rows),
        ]
    )
    report_write(
        name="request_overhead",
        title="Request overhead: tenant resolution + API-key auth",
        results=results,
        markdown=markdown,
    )


def _redis_command_mix(counts: dict[str, float]) -> str:
    mix = [f"{name.removeprefix('redis:')} {count:g}" for name, count in counts.items() if name.startswith("redis:")]
    return ", ".join(mix) or "-"


def _timed_calls(function, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return samples


def _new_connection_get(key: str) -> None:
    # For reference: what a request would pay if it opened its own Redis connection.
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.get(key)
    client.close()


def test_resolution_functions(tenant_pair, bench_api_key, django_db_blocker, request):
    _, raw_key = bench_api_key
    prefix = api_key_parse_prefix(raw_key)
    tenant_host = host_of(tenant_pair.a)
    bare_host = settings.PARLEY_BASE_DOMAIN
    process_redis = get_redis()
    process_redis.set("parley:bench:probe", "x", ex=300)
    functions = {
        "GET on the process-wide client (one round trip)": lambda: process_redis.get("parley:bench:probe"),
        "GET on a new connection (for reference)": lambda: _new_connection_get("parley:bench:probe"),
        "api_key_resolve(prefix), cached": lambda: api_key_resolve(prefix),
        "tenant_resolve_by_host(tenant host), cached": lambda: tenant_resolve_by_host(tenant_host),
        "tenant_resolve_by_host(bare host), negative-cached": lambda: tenant_resolve_by_host(bare_host),
        "api_key_hash(raw key) (HMAC-SHA-256)": lambda: api_key_hash(raw_key),
    }
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
        assert api_key_resolve(prefix).tenant.pk == tenant_pair.a.pk
        assert tenant_resolve_by_host(tenant_host).pk == tenant_pair.a.pk
        assert tenant_resolve_by_host(bare_host) is None
        distributions = {}
        for label, function in functions.items():
            _timed_calls(function, FUNCTION_WARMUP_CALLS)
            distributions[label] = Distribution.of(_timed_calls(function, FUNCTION_CALLS))

    headers = ["function", "p50 µs", "p90 µs", "p99 µs", "max µs"]
    rows = [
        [label, *(format_duration(getattr(d, f), "us") for f in ("p50", "p90", "p99", "max"))]
        for label, d in distributions.items()
    ]
    print(
        f"\nResolution functions: {FUNCTION_CALLS} calls each after {FUNCTION_WARMUP_CALLS} warm-up calls, "
        "cache warm, in the test's thread"
    )
    print(text_table(headers, rows))
    results = {
        "environment": environment,
        "method": {"calls": FUNCTION_CALLS, "warmup_calls": FUNCTION_WARMUP_CALLS, "thread": "the test's own"},
        "functions_us": {label: d.as_dict(unit="us") for label, d in distributions.items()},
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            f"{FUNCTION_CALLS} calls each after {FUNCTION_WARMUP_CALLS} warm-up calls, cache warm, called directly "
            "(no request).",
            markdown_table(headers, rows),
        ]
    )
    report_write(
        name="resolution_functions", title="Resolution functions (direct calls)", results=results, markdown=markdown
    )
