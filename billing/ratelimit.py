"""Rate limits in Redis: requests and tokens per minute, per API key, tenant, bot and end user.

Every limit is a GCRA (generic cell rate algorithm) cell: one Redis key holding the limit's
theoretical arrival time (TAT), the instant at which the limit would be back to full. A limit of
``per_minute`` units refills one unit every ``60 s / per_minute`` (the emission interval); a
request costing ``n`` units moves the TAT ``n`` intervals later and is admitted while the TAT
stays within ``burst`` intervals of now. ``burst`` defaults to ``per_minute``: a client idle for
a minute may spend the whole minute's allowance at once (as a fixed one-minute window would let
it), and after that gets a steady ``per_minute`` spread evenly, never twice the rate across a
window boundary. Lower it to smooth bursts.

One Lua script checks all the limits of a request atomically and all-or-nothing: if any refuses,
none is consumed, so a request refused by its tenant's limit costs its API key nothing. The
script reads the clock with Redis's ``TIME``, so web replicas with skewed clocks agree; scripts
replicate by their effects (the default since Redis 5), which is what allows ``TIME`` there.
Keys expire when their TAT passes, so an idle limit leaves nothing behind.

Token counts are known only after a call, so a request is checked against its estimate (prompt
and ``max_tokens``), and ``tokens_charge`` settles the real usage afterwards without refusing:
it may push a limit into debt, which refuses the next requests until it is paid back.

Keys are ``t:<schema>:rl:<kind>:<scope>:<identity>``: under the tenant's prefix, so tenants never
share a counter and deleting a tenant purges its limits. The caller names the schema (resolved
once, at the edge) rather than this module reading the connection's: asyncio code has none.

If Redis is unreachable, requests are admitted (and the failure logged): an answer matters more
than its bookkeeping, and every limit catches up once Redis is back.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError
from redis.exceptions import TimeoutError as RedisTimeoutError

from config.logging import get_logger
from tenants.errors import ParleyError
from tenants.redis import get_loop_redis, get_redis, lua_source, script_queue, script_sha, tenant_key

logger = get_logger(__name__)

MINUTE_US = 60_000_000
KINDS = ("requests", "tokens")
AUTH_FAILURE_LIMIT_DEFAULT = 20
AUTH_FAILURE_WINDOW_SECONDS_DEFAULT = 300

# How the messages name a limit's scope: "... on this API key (60/min)".
_SCOPE_NAMES = {
    "key": "this API key",
    "tenant": "this tenant",
    "bot": "this bot",
    "end_user": "this user",
}

# GCRA over several cells in one atomic step. Times are in microseconds. A cell's state is its
# "debt": how far its TAT lies ahead of now. Its emission interval, period / count, is seldom a
# whole number of microseconds, so debts are kept scaled by ``count`` (exact integers: no
# rounding that would let a burst admit one unit more or less); the stored value is the TAT as
# "<µs>" or "<µs>:<remainder>", the remainder being in 1/count of a microsecond.
#
# ARGV[1]: 'check' (admit all or consume none), 'charge' (consume, never refuse; a negative cost
#          refunds), 'peek' (check, consume nothing), 'mark' ('check', the last key not a limit
#          but a marker, set for a minute when the request is admitted: chat.admission's gate).
# ARGV[2]: now in µs, or '' for the server's clock (tests pass their own).
# ARGV[3..]: per key, four values: count, period_us (count units per period), burst, cost.
# Returns {admitted, index of the first refusing key or 0, retry_us, then per key: remaining, reset_us}.
GCRA_SCRIPT = lua_source("billing/lua/rate_limit_gcra.lua")


@dataclass(frozen=True, slots=True)
class Limit:
    """``per_minute`` units of ``kind`` for one ``identity`` of a ``scope``; 0 or less: unlimited.

    ``burst`` is how many units may arrive at once on an idle limit (GCRA's tolerance); ``None``
    means ``per_minute``: a full minute's allowance at once, then a steady rate. Arithmetic is
    exact up to a burst of 150 million units (burst x 60e6 within a double's 2**53); beyond
    that it is approximate by a unit or so.
    """

    scope: str  # "key", "tenant", "bot", "end_user": named in messages
    identity: str  # key id, bot public id, "visitor:<id>" / "ip:<address>", ...
    kind: str  # "requests" or "tokens"
    per_minute: int
    burst: int | None = None

    @property
    def is_unlimited(self) -> bool:
        return self.per_minute <= 0

    @property
    def burst_units(self) -> int:
        return max(1, self.per_minute if self.burst is None else self.burst)


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after: float  # seconds until the request would be admitted; 0 when admitted
    limited_by: Limit | None  # the first limit (in the order given) that refused
    # Per kind, the tightest limit's (per_minute, remaining units, seconds until full again): headers.
    states: dict[str, tuple[int, int, float]]


def _admitted() -> RateDecision:
    return RateDecision(allowed=True, retry_after=0.0, limited_by=None, states={})


class RateLimited(ParleyError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.retry_after = retry_after

    @classmethod
    def from_decision(cls, decision: RateDecision) -> RateLimited:
        limit = decision.limited_by
        seconds = math.ceil(decision.retry_after)
        if limit is None:
            message = f"Rate limit reached. Retry after {seconds} s."
        else:
            scope = _SCOPE_NAMES.get(limit.scope, f"this {limit.scope.replace('_', ' ')}")
            message = (
                f"Rate limit reached for {limit.kind} per minute on {scope} ({limit.per_minute}/min). "
                f"Retry after {seconds} s."
            )
        return cls(message, retry_after=decision.retry_after, headers=rate_limit_headers(decision))


def limit_key(*, schema_name: str, limit: Limit) -> str:
    return tenant_key(schema_name, "rl", limit.kind, limit.scope, limit.identity)


def auth_failure_key(identity: str) -> str:
    # Platform-wide: key authentication happens before any tenant is known.
    return f"rl:authfail:{identity}"


# A script object per client: the sync client may be replaced (get_redis.cache_clear()), and an
# asyncio client belongs to one event loop.
_scripts: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _script(client: redis.Redis | aioredis.Redis) -> Any:
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = client.register_script(GCRA_SCRIPT)
    return script


@dataclass(frozen=True, slots=True)
class RateLimitCall:
    limits: list[Limit]
    keys: list[str]
    args: list[str | int]


def _now_arg(now_ms: float | None) -> str | int:
    return "" if now_ms is None else round(now_ms * 1000)


def _check_call(
    *, schema_name: str, limits: Sequence[Limit], costs: Mapping[str, int], now_ms: float | None
) -> RateLimitCall:
    active = [limit for limit in limits if not limit.is_unlimited and limit.kind in costs]
    args: list[str | int] = ["check", _now_arg(now_ms)]
    for limit in active:
        args += [limit.per_minute, MINUTE_US, limit.burst_units, costs[limit.kind]]
    return RateLimitCall(active, [limit_key(schema_name=schema_name, limit=limit) for limit in active], args)


def _charge_call(*, schema_name: str, limits: Sequence[Limit], tokens: int, now_ms: float | None) -> RateLimitCall:
    active = [limit for limit in limits if not limit.is_unlimited and limit.kind == "tokens"]
    args: list[str | int] = ["charge", _now_arg(now_ms)]
    for limit in active:
        args += [limit.per_minute, MINUTE_US, limit.burst_units, tokens]
    return RateLimitCall(active, [limit_key(schema_name=schema_name, limit=limit) for limit in active], args)


def _decision(call: RateLimitCall, reply: list[int]) -> RateDecision:
    is_allowed, first_refused, retry_us = int(reply[0]), int(reply[1]), int(reply[2])
    tightest: dict[str, tuple[int, int, float]] = {}
    for index, limit in enumerate(call.limits):
        remaining, reset_us = int(reply[3 + 2 * index]), int(reply[4 + 2 * index])
        state = (limit.per_minute, remaining, reset_us / 1e6)
        current = tightest.get(limit.kind)
        if current is None or (remaining, -state[2]) < (current[1], -current[2]):
            tightest[limit.kind] = state
    return RateDecision(
        allowed=bool(is_allowed),
        retry_after=retry_us / 1e6,
        limited_by=call.limits[first_refused - 1] if first_refused else None,
        states=tightest,
    )


@contextmanager
def _unless_redis_is_unreachable(operation: str) -> Iterator[None]:
    """Log and suppress Redis being unreachable or too slow; the caller then admits.

    Anything else propagates: a script error is a bug, and an exhausted connection pool
    (``MaxConnectionsError``, a ``ConnectionError`` too) is this process's overload, which must
    not open the gates at the very moment traffic peaks.
    """
    try:
        yield
    except MaxConnectionsError:
        raise
    except (RedisConnectionError, RedisTimeoutError) as error:
        logger.warning("rate_limit_redis_unreachable", operation=operation, error=repr(error))


def _evaluate(operation: str, keys: list[str], args: list[str | int]) -> list[int] | None:
    """The script's reply, or None when Redis is unreachable."""
    client = get_redis()
    with _unless_redis_is_unreachable(operation):
        return _script(client)(keys=keys, args=args, client=client)
    return None


async def _evaluate_async(operation: str, keys: list[str], args: list[str | int]) -> list[int] | None:
    client = get_loop_redis()
    with _unless_redis_is_unreachable(operation):
        return await _script(client)(keys=keys, args=args, client=client)
    return None


def rate_limit(
    *, schema_name: str, limits: Sequence[Limit], costs: Mapping[str, int], now_ms: float | None = None
) -> RateDecision:
    """Admit a request against all ``limits`` at once, or consume nothing.

    ``costs`` per kind: ``{"requests": 1, "tokens": <prompt estimate + max_tokens>}``; a limit
    whose kind has no cost, or no rate, is skipped. Keys live under ``schema_name``, the tenant's
    schema. ``now_ms`` is for tests only (the default is Redis's clock). Raise
    ``RateLimited.from_decision(decision)`` when refused; add ``rate_limit_headers(decision)`` to
    admitted responses.
    """
    call = _check_call(schema_name=schema_name, limits=limits, costs=costs, now_ms=now_ms)
    reply = _evaluate("rate_limit", call.keys, call.args) if call.keys else None
    return _admitted() if reply is None else _decision(call, reply)


async def rate_limit_async(
    *, schema_name: str, limits: Sequence[Limit], costs: Mapping[str, int], now_ms: float | None = None
) -> RateDecision:
    """``rate_limit`` for asyncio code, on the event loop's shared client."""
    call = _check_call(schema_name=schema_name, limits=limits, costs=costs, now_ms=now_ms)
    reply = await _evaluate_async("rate_limit", call.keys, call.args) if call.keys else None
    return _admitted() if reply is None else _decision(call, reply)


async def rate_limit_refund_async(*, schema_name: str, limits: Sequence[Limit], costs: Mapping[str, int]) -> None:
    """Give back what an admitted check took, for a request that went no further (never refuses)."""
    call = _check_call(
        schema_name=schema_name, limits=limits, costs={kind: -cost for kind, cost in costs.items()}, now_ms=None
    )
    if call.keys:
        await _evaluate_async("rate_limit_refund", call.keys, ["charge", *call.args[1:]])


def rate_limit_queue(
    pipe, *, schema_name: str, limits: Sequence[Limit], costs: Mapping[str, int], marker: str | None = None
) -> RateLimitCall:
    """``rate_limit_async``'s script queued on ``pipe`` (the gateway reserves the budget in the
    same round trip); give the call and its reply to :func:`rate_limit_finish_async`. Nothing is
    queued when no limit applies. ``marker``: a key the script sets (for a minute) when it admits
    the request, for a later command of the same round trip to see (chat.admission's gate)."""
    call = _check_call(schema_name=schema_name, limits=limits, costs=costs, now_ms=None)
    if call.keys:
        if marker is None:
            pipe.evalsha(_script_sha(), len(call.keys), *call.keys, *call.args)
        else:
            pipe.evalsha(_script_sha(), len(call.keys) + 1, *call.keys, marker, "mark", *call.args[1:])
    return call


async def rate_limit_finish_async(call: RateLimitCall, reply: Any) -> RateDecision:
    """The queued check's decision, as ``rate_limit_async`` would give it (the script is loaded
    and run again when Redis lost it)."""
    if not call.keys:
        return _admitted()
    if isinstance(reply, redis.exceptions.NoScriptError):
        reply = await _evaluate_async("rate_limit", call.keys, call.args)
        return _admitted() if reply is None else _decision(call, reply)
    if isinstance(reply, Exception):
        raise reply
    return _decision(call, reply)


def tokens_charge(
    *, schema_name: str, limits: Sequence[Limit], tokens: int, reserved: int = 0, now_ms: float | None = None
) -> None:
    """Settle a finished call's real token usage on the "tokens" limits, never refusing.

    ``reserved`` is the estimate the request was admitted with (its ``costs["tokens"]``): only
    the difference is charged, and a call that used less than its estimate is refunded. Going
    beyond the burst leaves the limit in debt, which refuses the next requests until repaid.
    """
    call = _charge_call(schema_name=schema_name, limits=limits, tokens=tokens - reserved, now_ms=now_ms)
    if call.keys and tokens != reserved:
        _evaluate("tokens_charge", call.keys, call.args)


async def tokens_charge_async(
    *, schema_name: str, limits: Sequence[Limit], tokens: int, reserved: int = 0, now_ms: float | None = None
) -> None:
    """``tokens_charge`` for asyncio code."""
    call = _charge_call(schema_name=schema_name, limits=limits, tokens=tokens - reserved, now_ms=now_ms)
    if call.keys and tokens != reserved:
        await _evaluate_async("tokens_charge", call.keys, call.args)


def tokens_charge_queue(pipe, *, schema_name: str, limits: Sequence[Limit], tokens: int, reserved: int = 0) -> None:
    """``tokens_charge`` queued on ``pipe`` (one round trip with a turn's other end-of-turn writes;
    run by ``tenants.redis.execute_with_scripts``)."""
    call = _charge_call(schema_name=schema_name, limits=limits, tokens=tokens - reserved, now_ms=None)
    if call.keys and tokens != reserved:
        script_queue(pipe, GCRA_SCRIPT, len(call.keys), *call.keys, *call.args)


def _duration(seconds: float) -> str:
    """OpenAI's reset format (Go durations), rounded up to the millisecond: "120ms", "1.2s", "6m0s"."""
    milliseconds = math.ceil(seconds * 1000 - 1e-6)
    if milliseconds <= 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


def rate_limit_headers(decision: RateDecision) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, and ``Retry-After`` when refused."""
    headers: dict[str, str] = {}
    for kind in KINDS:
        state = decision.states.get(kind)
        if state is None:
            continue
        per_minute, remaining, reset = state
        headers[f"x-ratelimit-limit-{kind}"] = str(per_minute)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    if not decision.allowed:
        headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    return headers


def _auth_failure_args(mode: str, now_ms: float | None) -> list[str | int] | None:
    """The script's arguments for the brute-force limit, or None when it is switched off (limit 0)."""
    limit = getattr(settings, "PARLEY_AUTH_FAILURE_LIMIT", AUTH_FAILURE_LIMIT_DEFAULT)
    window = getattr(settings, "PARLEY_AUTH_FAILURE_WINDOW_SECONDS", AUTH_FAILURE_WINDOW_SECONDS_DEFAULT)
    if limit <= 0 or window <= 0:
        return None
    return [mode, _now_arg(now_ms), limit, round(window * 1_000_000), limit, 1]


def auth_failure_register(*, identity: str, now_ms: float | None = None) -> None:
    """Count one failed credential check of a client (e.g. "ip:1.2.3.4"), never refusing."""
    args = _auth_failure_args("charge", now_ms)
    if args is not None:
        _evaluate("auth_failure_register", [auth_failure_key(identity)], args)


def auth_failures_exceeded(*, identity: str, now_ms: float | None = None) -> float | None:
    """Seconds the client must wait before its next credential check, or None if it may try now.

    A client may fail ``PARLEY_AUTH_FAILURE_LIMIT`` times (default 20) at once, then once per
    ``PARLEY_AUTH_FAILURE_WINDOW_SECONDS / PARLEY_AUTH_FAILURE_LIMIT`` (default 15 s).
    """
    args = _auth_failure_args("peek", now_ms)
    reply = None if args is None else _evaluate("auth_failures_exceeded", [auth_failure_key(identity)], args)
    if reply is None or int(reply[0]):
        return None
    return int(reply[2]) / 1e6


async def auth_failure_register_async(*, identity: str) -> None:
    """``auth_failure_register`` on the event loop's client (the async edge)."""
    args = _auth_failure_args("charge", None)
    if args is not None:
        await _evaluate_async("auth_failure_register", [auth_failure_key(identity)], args)


def auth_failures_peek_queue(pipe, identity: str) -> None:
    """``auth_failures_exceeded``'s script queued on ``pipe`` (the edge's first round trip), unless
    the limit is switched off; its reply goes to :func:`auth_failures_retry_after`."""
    args = _auth_failure_args("peek", None)
    if args is not None:
        pipe.evalsha(_script_sha(), 1, auth_failure_key(identity), *args)


async def auth_failures_retry_after(reply, *, identity: str) -> float | None:
    """``auth_failures_exceeded``'s answer from a queued peek's reply (None: nothing was queued;
    asked again, directly, when the pipeline could not run the script: not loaded yet, Redis
    trouble)."""
    if reply is None:
        return None
    if isinstance(reply, Exception):
        return await auth_failures_exceeded_async(identity=identity)
    if int(reply[0]):
        return None
    return int(reply[2]) / 1e6


@cache
def _script_sha() -> str:
    return script_sha(GCRA_SCRIPT)


async def auth_failures_exceeded_async(*, identity: str) -> float | None:
    """``auth_failures_exceeded`` on the event loop's client (the async edge)."""
    args = _auth_failure_args("peek", None)
    reply = (
        None if args is None else await _evaluate_async("auth_failures_exceeded", [auth_failure_key(identity)], args)
    )
    if reply is None or int(reply[0]):
        return None
    return int(reply[2]) / 1e6
