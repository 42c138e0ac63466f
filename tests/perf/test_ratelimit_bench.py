"""What one rate-limit check costs (target: p50 < 0.5 ms), sync and asyncio.

One check is what a chat request pays: four limits (API key, tenant, bot, end user), each for
requests and tokens, so eight GCRA cells read and written by one script (one EVALSHA round trip)
on the embedded Redis over loopback. Variants are interleaved call by call, so a busy neighbour
slows them all alike:

- ``GET``: one GET on the same client, the floor any Redis-backed check pays.
- ``admitted``: ``rate_limit`` with limits high enough that every call is admitted (eight reads,
  eight writes).
- ``refused``: the same limits for another end user whose tokens limit is deep in debt, so every
  call is refused by the last cell checked (eight reads, no write): the path a client hammering
  an exhausted limit takes.

The async variants run the same on the event loop's shared client (``rate_limit_async``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from billing.ratelimit import Limit, rate_limit, rate_limit_async, tokens_charge
from tenants.redis import get_loop_redis, get_redis, tenant_keys_purge
from tests.perf.reporting import (
    Distribution,
    environment_markdown,
    format_duration,
    markdown_table,
    percentile,
    report_write,
    run_environment,
    text_table,
)

CALLS = 5000
WARMUP_CALLS = 500
SCHEMA = "bench_ratelimit"  # a key prefix only: the checks need no tenant in the database
PROBE_KEY = "parley:bench:ratelimit-probe"
COSTS = {"requests": 1, "tokens": 500}
# High enough that nothing is refused over every call of every admitted variant (warm-up included).
REQUESTS_PER_MINUTE = 1_000_000
TOKENS_PER_MINUTE = 10_000_000
TARGET_P50_MS = 0.5


def _limits(*, end_user: str, end_user_tokens: int = TOKENS_PER_MINUTE) -> list[Limit]:
    scopes = [("key", "12"), ("tenant", SCHEMA), ("bot", "bot_bench"), ("end_user", end_user)]
    limits = []
    for scope, identity in scopes:
        tokens = end_user_tokens if scope == "end_user" else TOKENS_PER_MINUTE
        limits.append(Limit(scope=scope, identity=identity, kind="requests", per_minute=REQUESTS_PER_MINUTE))
        limits.append(Limit(scope=scope, identity=identity, kind="tokens", per_minute=tokens))
    return limits


ADMITTED_LIMITS = _limits(end_user="visitor:bench")
# The same key, tenant and bot; an end user whose tokens limit is put days in debt before the run.
REFUSED_LIMITS = _limits(end_user="visitor:in-debt", end_user_tokens=1000)
DEBT_TOKENS = 10_000_000


def _interleaved(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in functions}
    items = list(functions.items())
    for round_number in range(rounds):
        shift = round_number % len(items)  # rotate the order so that none always goes first
        for name, function in items[shift:] + items[:shift]:
            started = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - started)
    return samples


async def _interleaved_async(
    functions: dict[str, Callable[[], Awaitable[object]]], rounds: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in functions}
    items = list(functions.items())
    for round_number in range(rounds):
        shift = round_number % len(items)
        for name, function in items[shift:] + items[:shift]:
            started = time.perf_counter()
            await function()
            samples[name].append(time.perf_counter() - started)
    return samples


def _sync_run() -> tuple[dict[str, list[float]], dict[str, int]]:
    client = get_redis()
    allowed = {"admitted": 0, "refused": 0}

    def admitted() -> None:
        allowed["admitted"] += rate_limit(schema_name=SCHEMA, limits=ADMITTED_LIMITS, costs=COSTS).allowed

    def refused() -> None:
        allowed["refused"] += rate_limit(schema_name=SCHEMA, limits=REFUSED_LIMITS, costs=COSTS).allowed

    functions = {"GET": lambda: client.get(PROBE_KEY), "admitted": admitted, "refused": refused}
    _interleaved(functions, WARMUP_CALLS)
    allowed.update(admitted=0, refused=0)
    return _interleaved(functions, CALLS), allowed


async def _async_run() -> tuple[dict[str, list[float]], dict[str, int]]:
    client = get_loop_redis()
    allowed = {"admitted": 0, "refused": 0}

    async def admitted() -> None:
        decision = await rate_limit_async(schema_name=SCHEMA, limits=ADMITTED_LIMITS, costs=COSTS)
        allowed["admitted"] += decision.allowed

    async def refused() -> None:
        decision = await rate_limit_async(schema_name=SCHEMA, limits=REFUSED_LIMITS, costs=COSTS)
        allowed["refused"] += decision.allowed

    functions = {"GET": lambda: client.get(PROBE_KEY), "admitted": admitted, "refused": refused}
    try:
        await _interleaved_async(functions, WARMUP_CALLS)
        allowed.update(admitted=0, refused=0)
        return await _interleaved_async(functions, CALLS), allowed
    finally:
        await client.aclose()


VARIANT_DESCRIPTIONS = {
    "GET": "one GET on the same client (floor)",
    "admitted": "rate_limit, 4 limits x 2 kinds, admitted",
    "refused": "rate_limit, 4 limits x 2 kinds, refused by the 8th cell",
}


def test_rate_limit_check_cost(django_db_setup, django_db_blocker, request):
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
    redis = get_redis()
    tenant_keys_purge(SCHEMA)  # an interrupted run may have left cells behind
    redis.set(PROBE_KEY, "x", ex=300)
    tokens_charge(schema_name=SCHEMA, limits=[REFUSED_LIMITS[-1]], tokens=DEBT_TOKENS)
    try:
        sync_samples, sync_allowed = _sync_run()
        async_samples, async_allowed = asyncio.run(_async_run())
        cells = sorted(key.decode() for key in redis.scan_iter(match=f"t:{SCHEMA}:rl:*"))
    finally:
        tenant_keys_purge(SCHEMA)
        redis.delete(PROBE_KEY)

    # Sanity, not timing: every admitted call admitted, every refused one refused; only cells of
    # the admitted checks (those whose time has passed already expired) and the indebted one: a
    # refused check writes nothing.
    assert sync_allowed == async_allowed == {"admitted": CALLS, "refused": 0}
    indebted = f"t:{SCHEMA}:rl:tokens:end_user:visitor:in-debt"
    admitted_cells = {f"t:{SCHEMA}:rl:{limit.kind}:{limit.scope}:{limit.identity}" for limit in ADMITTED_LIMITS}
    assert indebted in cells
    assert set(cells) - {indebted} <= admitted_cells
    assert list(redis.scan_iter(match=f"t:{SCHEMA}:*")) == []

    runs = {"sync": sync_samples, "async": async_samples}
    headers = ["client", "variant", "what", "p50 µs", "p95 µs", "p99 µs", "max µs"]
    rows = []
    figures: dict[str, dict[str, dict[str, float | int]]] = {}
    for client_name, samples in runs.items():
        figures[client_name] = {}
        for name, values in samples.items():
            ordered = sorted(values)
            distribution = Distribution.of(ordered)
            p95 = percentile(ordered, 0.95)
            figures[client_name][name] = {**distribution.as_dict(unit="us"), "p95": round(p95 * 1e6, 3)}
            rows.append(
                [
                    client_name,
                    name,
                    VARIANT_DESCRIPTIONS[name],
                    format_duration(distribution.p50, "us"),
                    format_duration(p95, "us"),
                    format_duration(distribution.p99, "us"),
                    format_duration(distribution.max, "us"),
                ]
            )
    added_headers = ["client", "admitted p50 - GET p50 µs", "refused p50 - GET p50 µs"]
    added_rows = [
        [
            client_name,
            format_duration((figures[client_name]["admitted"]["p50"] - figures[client_name]["GET"]["p50"]) / 1e6, "us"),
            format_duration((figures[client_name]["refused"]["p50"] - figures[client_name]["GET"]["p50"]) / 1e6, "us"),
        ]
        for client_name in runs
    ]
    summary = (
        f"{CALLS} calls per variant, interleaved call by call, after {WARMUP_CALLS} warm-up calls each; "
        "one process, sequential calls, embedded Redis on loopback. One check = 8 GCRA cells "
        "(API key, tenant, bot, end user; requests and tokens each) in one script call. "
        f"Target: p50 < {TARGET_P50_MS} ms."
    )

    print(f"\nRate-limit check: {summary}")
    print(text_table(headers, rows))
    print()
    print(text_table(added_headers, added_rows))

    results = {
        "environment": environment,
        "method": {
            "calls_per_variant": CALLS,
            "warmup_calls_per_variant": WARMUP_CALLS,
            "order": "interleaved, rotated each round",
            "limits": [f"{limit.scope}:{limit.kind}:{limit.per_minute}/min" for limit in ADMITTED_LIMITS],
            "costs": COSTS,
            "sync_client": "tenants.redis.get_redis()",
            "async_client": "tenants.redis.get_loop_redis()",
        },
        "variants": VARIANT_DESCRIPTIONS,
        "us": figures,
        "target_ms": {"p50": TARGET_P50_MS},
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            summary,
            markdown_table(headers, rows),
            markdown_table(added_headers, added_rows),
        ]
    )
    report_write(name="rate_limit", title="Rate-limit check cost", results=results, markdown=markdown)
