"""Rate limits: GCRA cells in Redis, checked all-or-nothing, shared by every process.

Most tests pass ``now_ms`` (the script's clock override) so that refills are exact without
sleeping; the ones about the default clock use Redis's TIME.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError
from redis.retry import Retry

from billing import ratelimit
from billing.ratelimit import (
    Limit,
    RateDecision,
    RateLimited,
    auth_failure_key,
    auth_failure_register,
    auth_failures_exceeded,
    limit_key,
    rate_limit,
    rate_limit_async,
    rate_limit_headers,
    tokens_charge,
    tokens_charge_async,
)
from tenants.errors import error_response
from tenants.redis import get_redis

SCHEMA = "acme"
OTHER_SCHEMA = "globex"
T0 = 1_800_000_000_000.0  # ms; any instant will do when the clock is passed in
ONE_REQUEST = {"requests": 1}


def key_limit(per_minute: int, *, burst: int | None = None, kind: str = "requests") -> Limit:
    return Limit(scope="key", identity="12", kind=kind, per_minute=per_minute, burst=burst)


def admitted_count(limits: list[Limit], *, attempts: int, now_ms: float = T0, costs=ONE_REQUEST) -> int:
    return sum(
        rate_limit(schema_name=SCHEMA, limits=limits, costs=costs, now_ms=now_ms).allowed for _ in range(attempts)
    )


@pytest.mark.parametrize(
    ("per_minute", "burst", "admitted", "retry_after"),
    [
        (60, None, 60, 1.0),
        (7, None, 7, 8.571429),  # a fractional interval (60/7 s), still exactly 7: no rounding drift
        (600, 10, 10, 0.1),
        (1, 3, 3, 60.0),
    ],
    ids=["burst_defaults_to_rate_case", "fractional_interval_case", "small_burst_case", "burst_above_rate_case"],
)
def test_admits_exactly_the_burst_then_refuses_with_the_time_to_the_next_unit(per_minute, burst, admitted, retry_after):
    limit = key_limit(per_minute, burst=burst)

    assert admitted_count([limit], attempts=admitted) == admitted
    refused = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)

    assert refused.allowed is False
    assert refused.retry_after == retry_after
    assert refused.limited_by == limit
    assert refused.states == {"requests": (per_minute, 0, pytest.approx(admitted * 60 / per_minute))}


def test_refills_one_unit_per_interval_and_the_whole_burst_after_a_minute():
    limit = key_limit(60)
    assert admitted_count([limit], attempts=61) == 60

    # Just before the next unit is due: still refused, 1 ms to go.
    almost = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0 + 999)
    assert (almost.allowed, almost.retry_after) == (False, 0.001)
    # One interval later, exactly one more.
    assert admitted_count([limit], attempts=3, now_ms=T0 + 1000) == 1
    # A minute after the burst (and the one extra), the limit is full again.
    assert admitted_count([limit], attempts=70, now_ms=T0 + 61_000) == 60


def test_an_admission_stores_the_tat_and_expires_when_it_has_passed():
    limit = key_limit(60)
    key = limit_key(schema_name=SCHEMA, limit=limit)

    decision = rate_limit(schema_name=SCHEMA, limits=[limit], costs={"requests": 5}, now_ms=T0)

    assert key == "t:acme:rl:requests:key:12"
    assert get_redis().get(key) == str(int(T0 * 1000) + 5_000_000).encode()  # TAT in µs: 5 intervals ahead
    assert 4_900 < get_redis().pttl(key) <= 5_000
    assert decision.states == {"requests": (60, 55, 5.0)}


def test_a_fractional_interval_keeps_its_remainder_exactly():
    limit = key_limit(7)
    key = limit_key(schema_name=SCHEMA, limit=limit)

    rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)

    # 60/7 s = 8,571,428 + 4/7 µs: the remainder is kept in sevenths of a microsecond.
    assert get_redis().get(key) == f"{int(T0 * 1000) + 8_571_428}:4".encode()


def test_the_default_clock_is_redis_time_and_refills_in_real_time():
    limit = key_limit(600, burst=1)  # one request per 100 ms
    key = limit_key(schema_name=SCHEMA, limit=limit)

    first = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST)
    refused = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST)
    seconds, microseconds = get_redis().time()
    tat_us = int(get_redis().get(key))

    assert first.allowed is True
    assert refused.allowed is False
    assert 0 < refused.retry_after <= 0.1
    assert 0 < tat_us - (seconds * 1_000_000 + microseconds) <= 100_000
    time.sleep(refused.retry_after + 0.005)
    assert rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST).allowed is True


def test_a_refused_limit_consumes_nothing_from_the_others():
    key = key_limit(10)
    tenant = Limit(scope="tenant", identity="acme", kind="requests", per_minute=2)
    bot = Limit(scope="bot", identity="bot_abc", kind="requests", per_minute=100)
    assert admitted_count([key, tenant, bot], attempts=2) == 2

    refused = rate_limit(schema_name=SCHEMA, limits=[key, tenant, bot], costs=ONE_REQUEST, now_ms=T0)

    assert refused.allowed is False
    assert refused.limited_by == tenant
    assert refused.retry_after == 30.0
    # The key and the bot were charged for the two admitted requests only.
    assert rate_limit(schema_name=SCHEMA, limits=[key], costs=ONE_REQUEST, now_ms=T0).states == {
        "requests": (10, 7, 18.0)
    }
    assert rate_limit(schema_name=SCHEMA, limits=[bot], costs=ONE_REQUEST, now_ms=T0).states == {
        "requests": (100, 97, 1.8)
    }


def test_retry_after_is_the_longest_wait_among_the_refusing_limits():
    key = key_limit(60, burst=1)
    tenant = Limit(scope="tenant", identity="acme", kind="requests", per_minute=6, burst=1)
    assert admitted_count([key, tenant], attempts=1) == 1

    refused = rate_limit(schema_name=SCHEMA, limits=[key, tenant], costs=ONE_REQUEST, now_ms=T0)

    assert refused.limited_by == key  # the first that refused, in the order given
    assert refused.retry_after == 10.0  # but the request waits for the tenant's limit too


def test_tokens_are_charged_by_the_estimate_and_refused_without_touching_requests():
    requests = key_limit(100)
    tokens = key_limit(1000, kind="tokens")
    limits = [requests, tokens]

    first = rate_limit(schema_name=SCHEMA, limits=limits, costs={"requests": 1, "tokens": 600}, now_ms=T0)
    too_many = rate_limit(schema_name=SCHEMA, limits=limits, costs={"requests": 1, "tokens": 600}, now_ms=T0)
    fits = rate_limit(schema_name=SCHEMA, limits=limits, costs={"requests": 1, "tokens": 400}, now_ms=T0)

    assert first.states == {"requests": (100, 99, 0.6), "tokens": (1000, 400, 36.0)}
    assert (too_many.allowed, too_many.limited_by, too_many.retry_after) == (False, tokens, 12.0)
    assert fits.allowed is True
    assert fits.states == {"requests": (100, 98, 1.2), "tokens": (1000, 0, 60.0)}


def test_a_request_larger_than_the_burst_needs_a_full_limit_and_leaves_it_in_debt():
    tokens = key_limit(1000, kind="tokens")
    costs = {"tokens": 1500}

    first = rate_limit(schema_name=SCHEMA, limits=[tokens], costs=costs, now_ms=T0)
    second = rate_limit(schema_name=SCHEMA, limits=[tokens], costs=costs, now_ms=T0 + 60_000)
    third = rate_limit(schema_name=SCHEMA, limits=[tokens], costs=costs, now_ms=T0 + 90_000)

    assert first.allowed is True
    assert first.states == {"tokens": (1000, 0, 90.0)}
    assert (second.allowed, second.retry_after) == (False, 30.0)
    assert third.allowed is True


def test_tokens_charge_pushes_into_debt_and_the_next_request_is_refused():
    requests = key_limit(100)
    tokens = key_limit(1000, kind="tokens")
    costs = {"requests": 1, "tokens": 100}
    assert rate_limit(schema_name=SCHEMA, limits=[requests, tokens], costs=costs, now_ms=T0).allowed is True

    tokens_charge(schema_name=SCHEMA, limits=[requests, tokens], tokens=3000, reserved=100, now_ms=T0)
    refused = rate_limit(schema_name=SCHEMA, limits=[requests, tokens], costs=costs, now_ms=T0)

    assert refused.allowed is False
    assert refused.limited_by == tokens
    assert refused.retry_after == 126.0  # (3,000 + 100 - 1,000) tokens at 60 ms each
    assert refused.states == {"requests": (100, 99, 0.6), "tokens": (1000, 0, 180.0)}  # requests untouched
    later = rate_limit(schema_name=SCHEMA, limits=[requests, tokens], costs=costs, now_ms=T0 + 126_000)
    assert later.allowed is True


def test_tokens_charge_refunds_an_estimate_larger_than_the_usage():
    tokens = key_limit(1000, kind="tokens")
    rate_limit(schema_name=SCHEMA, limits=[tokens], costs={"tokens": 800}, now_ms=T0)

    tokens_charge(schema_name=SCHEMA, limits=[tokens], tokens=200, reserved=800, now_ms=T0)

    assert rate_limit(schema_name=SCHEMA, limits=[tokens], costs={"tokens": 0}, now_ms=T0).states == {
        "tokens": (1000, 800, 12.0)
    }


def test_a_full_refund_removes_the_key():
    tokens = key_limit(1000, kind="tokens")
    rate_limit(schema_name=SCHEMA, limits=[tokens], costs={"tokens": 800}, now_ms=T0)

    tokens_charge(schema_name=SCHEMA, limits=[tokens], tokens=0, reserved=800, now_ms=T0)

    assert get_redis().exists(limit_key(schema_name=SCHEMA, limit=tokens)) == 0


def test_two_tenants_with_the_same_identities_do_not_share_counters():
    limit = key_limit(2)
    assert admitted_count([limit], attempts=3) == 2

    other = rate_limit(schema_name=OTHER_SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)

    assert other.allowed is True
    assert other.states == {"requests": (2, 1, 30.0)}
    assert sorted(get_redis().keys("*")) == [b"t:acme:rl:requests:key:12", b"t:globex:rl:requests:key:12"]


@pytest.mark.parametrize(
    ("limits", "costs"),
    [
        ([key_limit(0)], ONE_REQUEST),
        ([key_limit(-1)], ONE_REQUEST),
        ([key_limit(1000, kind="tokens")], ONE_REQUEST),
        ([], ONE_REQUEST),
    ],
    ids=["zero_rate_case", "negative_rate_case", "kind_without_cost_case", "no_limits_case"],
)
def test_unlimited_limits_and_kinds_without_a_cost_are_skipped(limits, costs):
    decisions = [rate_limit(schema_name=SCHEMA, limits=limits, costs=costs, now_ms=T0) for _ in range(5)]

    assert decisions == [RateDecision(allowed=True, retry_after=0.0, limited_by=None, states={})] * 5
    assert get_redis().dbsize() == 0


def test_skipped_limits_leave_the_others_checked():
    unlimited_tenant = Limit(scope="tenant", identity="acme", kind="requests", per_minute=0)
    assert admitted_count([unlimited_tenant, key_limit(3)], attempts=5) == 3


def test_headers_name_the_tightest_limit_of_each_kind():
    limits = [
        key_limit(60),
        Limit(scope="tenant", identity="acme", kind="requests", per_minute=600),
        key_limit(10_000, kind="tokens"),
    ]

    decision = rate_limit(schema_name=SCHEMA, limits=limits, costs={"requests": 1, "tokens": 2000}, now_ms=T0)

    assert rate_limit_headers(decision) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "10000",
        "x-ratelimit-remaining-tokens": "8000",
        "x-ratelimit-reset-tokens": "12s",
    }


def test_a_refusal_adds_retry_after_in_whole_seconds_rounded_up():
    limit = key_limit(40, burst=1)  # 1.5 s per request
    rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)

    refused = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0 + 1380)

    assert rate_limit_headers(refused) == {
        "x-ratelimit-limit-requests": "40",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "120ms",
        "Retry-After": "1",
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.0000004, "1ms"),
        (0.12, "120ms"),
        (0.999, "999ms"),
        (1.0, "1s"),
        (1.2, "1.2s"),
        (8.571429, "8.572s"),
        (60.0, "1m0s"),
        (360.0, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
    ids=[
        "zero_case",
        "rounded_up_case",
        "milliseconds_case",
        "just_under_a_second_case",
        "one_second_case",
        "fraction_case",
        "millisecond_precision_case",
        "one_minute_case",
        "minutes_case",
        "hours_case",
    ],
)
def test_reset_durations_use_openai_format(seconds, text):
    decision = RateDecision(allowed=True, retry_after=0.0, limited_by=None, states={"tokens": (100, 5, seconds)})
    assert rate_limit_headers(decision)["x-ratelimit-reset-tokens"] == text


@pytest.mark.parametrize(
    ("scope", "kind", "message"),
    [
        ("key", "requests", "Rate limit reached for requests per minute on this API key (60/min). Retry after 2 s."),
        ("tenant", "tokens", "Rate limit reached for tokens per minute on this tenant (60/min). Retry after 2 s."),
        ("bot", "requests", "Rate limit reached for requests per minute on this bot (60/min). Retry after 2 s."),
        ("end_user", "requests", "Rate limit reached for requests per minute on this user (60/min). Retry after 2 s."),
        (
            "widget_origin",
            "requests",
            "Rate limit reached for requests per minute on this widget origin (60/min). Retry after 2 s.",
        ),
    ],
    ids=["key_case", "tenant_case", "bot_case", "end_user_case", "other_scope_case"],
)
def test_rate_limited_names_the_scope_and_the_limit(scope, kind, message):
    limit = Limit(scope=scope, identity="x", kind=kind, per_minute=60)
    decision = RateDecision(allowed=False, retry_after=1.2, limited_by=limit, states={kind: (60, 0, 61.2)})

    error = RateLimited.from_decision(decision)

    assert error.message == message
    assert error.retry_after == 1.2


def test_rate_limited_renders_as_an_openai_429_with_the_headers():
    limit = key_limit(1)
    rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)
    decision = rate_limit(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST, now_ms=T0)

    response = error_response(RateLimited.from_decision(decision))

    assert response.status_code == 429
    assert json.loads(response.content) == {
        "error": {
            "message": "Rate limit reached for requests per minute on this API key (1/min). Retry after 60 s.",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }
    assert response["Retry-After"] == "60"
    assert response["x-ratelimit-limit-requests"] == "1"
    assert response["x-ratelimit-remaining-requests"] == "0"
    assert response["x-ratelimit-reset-requests"] == "1m0s"


async def test_async_check_and_charge_share_the_limits_of_the_sync_ones():
    tokens = key_limit(1000, kind="tokens")
    decision = await rate_limit_async(schema_name=SCHEMA, limits=[tokens], costs={"tokens": 400}, now_ms=T0)
    await tokens_charge_async(schema_name=SCHEMA, limits=[tokens], tokens=1000, reserved=400, now_ms=T0)

    refused = rate_limit(schema_name=SCHEMA, limits=[tokens], costs={"tokens": 1}, now_ms=T0)

    assert decision.states == {"tokens": (1000, 600, 24.0)}
    assert (refused.allowed, refused.retry_after) == (False, 0.06)


async def test_concurrent_async_checks_admit_exactly_the_burst():
    # Two per minute: nothing refills while the checks run, so the count is exact. 90 at once:
    # within the loop client's pool (REDIS_MAX_CONNECTIONS, 200).
    limit = key_limit(2, burst=50)

    decisions = await asyncio.gather(
        *(rate_limit_async(schema_name=SCHEMA, limits=[limit], costs=ONE_REQUEST) for _ in range(90))
    )

    assert sum(decision.allowed for decision in decisions) == 50


HAMMER = """
import json, sys, time
from django.conf import settings
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError
from redis.retry import Retry
settings.configure(REDIS_URL=sys.argv[1])
import django
django.setup()
from billing.ratelimit import Limit, rate_limit
limit = Limit(scope="key", identity="shared", kind="requests", per_minute=2, burst=50)
warm_up = Limit(scope="key", identity="warm-up", kind="requests", per_minute=100_000)
rate_limit(schema_name="acme", limits=[warm_up], costs={"requests": 1})  # connected, script loaded
print("ready", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + float(sys.argv[2])
admitted = attempts = 0
while time.monotonic() < deadline:
    attempts += 1
    admitted += rate_limit(schema_name="acme", limits=[limit], costs={"requests": 1}).allowed
print(json.dumps({"admitted": admitted, "attempts": attempts}), flush=True)
"""


def test_two_processes_hammering_one_key_admit_exactly_the_limit_in_total():
    # Two per minute with a burst of 50: nothing refills during the 1.5 s run, so the total must be
    # exactly 50 whatever the interleaving; the clock is Redis's, as in production.
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, settings.REDIS_URL, "1.5"],
            cwd=Path(settings.BASE_DIR),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready"
        for process in processes:  # both start together
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [json.loads(process.stdout.readline()) for process in processes]
    finally:
        for process in processes:
            process.stdin.close()
            process.wait(timeout=30)

    assert [process.returncode for process in processes] == [0, 0]
    assert all(result["attempts"] > 50 for result in results)
    assert sum(result["admitted"] for result in results) == 50


def test_auth_failures_block_after_the_budget_and_unblock_one_interval_later(settings):
    settings.PARLEY_AUTH_FAILURE_LIMIT = 3
    settings.PARLEY_AUTH_FAILURE_WINDOW_SECONDS = 60
    identity = "ip:203.0.113.7"

    for _ in range(2):
        auth_failure_register(identity=identity, now_ms=T0)
    assert auth_failures_exceeded(identity=identity, now_ms=T0) is None
    auth_failure_register(identity=identity, now_ms=T0)

    assert auth_failures_exceeded(identity=identity, now_ms=T0) == 20.0
    assert auth_failures_exceeded(identity=identity, now_ms=T0) == 20.0  # asking consumes nothing
    assert auth_failures_exceeded(identity=identity, now_ms=T0 + 19_999) == 0.001
    assert auth_failures_exceeded(identity=identity, now_ms=T0 + 20_000) is None
    assert get_redis().keys("*") == [auth_failure_key(identity).encode()]
    assert auth_failure_key(identity) == "rl:authfail:ip:203.0.113.7"


def test_auth_failures_use_the_default_budget_and_redis_time():
    identity = "ip:198.51.100.1"
    for _ in range(19):
        auth_failure_register(identity=identity)
    assert auth_failures_exceeded(identity=identity) is None

    auth_failure_register(identity=identity)
    blocked_for = auth_failures_exceeded(identity=identity)

    assert blocked_for is not None
    assert 14.9 < blocked_for <= 15.0  # 20 failures per 5 minutes: one more every 15 s
    assert 299_000 < get_redis().pttl(auth_failure_key(identity)) <= 300_000


def test_auth_failure_limit_zero_switches_the_check_off(settings):
    settings.PARLEY_AUTH_FAILURE_LIMIT = 0

    auth_failure_register(identity="ip:192.0.2.1")

    assert auth_failures_exceeded(identity="ip:192.0.2.1") is None
    assert get_redis().dbsize() == 0


def test_an_unreachable_redis_admits_everything(monkeypatch):
    # No retries: redis-py's default retries with backoff would take seconds per call here.
    unreachable = redis.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), retries=0))
    monkeypatch.setattr(ratelimit, "get_redis", lambda: unreachable)

    decision = rate_limit(schema_name=SCHEMA, limits=[key_limit(1)], costs=ONE_REQUEST)
    tokens_charge(schema_name=SCHEMA, limits=[key_limit(1, kind="tokens")], tokens=10)
    auth_failure_register(identity="ip:192.0.2.1")

    assert decision == RateDecision(allowed=True, retry_after=0.0, limited_by=None, states={})
    assert auth_failures_exceeded(identity="ip:192.0.2.1") is None


def test_an_exhausted_connection_pool_raises_instead_of_admitting(monkeypatch):
    pool = redis.ConnectionPool.from_url(settings.REDIS_URL, max_connections=1)
    busy = pool.get_connection()
    monkeypatch.setattr(ratelimit, "get_redis", lambda: redis.Redis(connection_pool=pool))
    try:
        with pytest.raises(MaxConnectionsError):
            rate_limit(schema_name=SCHEMA, limits=[key_limit(1)], costs=ONE_REQUEST)
    finally:
        pool.release(busy)
        pool.disconnect()
