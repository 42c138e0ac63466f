"""Circuit breakers for route targets, with their state shared by every process through Redis.

closed ──(``failure_threshold`` consecutive failures)──► open ──(``cooldown_seconds``)──► half-open
half-open lets exactly one probe through: its success closes the circuit, its failure opens it
again. A probe that never reports (its process died) frees the half-open slot after
``probe_timeout_seconds``.

Each transition is one atomic Redis script, so web replicas and workers agree on a target's
state. A 429's Retry-After, when longer than the cool-down, keeps the circuit open that long.
If Redis itself fails, the breaker fails open: a chat answer matters more than its bookkeeping.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from config.logging import get_logger
from tenants.redis import lua_source, tenant_key

logger = get_logger(__name__)
T = TypeVar("T")

KEY_PREFIX = "parley:circuit"
_KEY_EXPIRY_MARGIN_SECONDS = 600  # a closed circuit's failure count is forgotten this long after the last failure


def circuit_key(circuit_id: str, *, schema_name: str | None = None) -> str:
    """Redis key of a circuit: under the tenant's prefix for tenant-owned targets, else platform-wide."""
    if schema_name:
        return tenant_key(schema_name, "circuit", circuit_id)
    return f"{KEY_PREFIX}:{circuit_id}"


class CircuitState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    failure_threshold: int = 5
    cooldown_seconds: float = 30.0
    probe_timeout_seconds: float = 60.0


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to "may a call go to this target now?" and the state seen when asking."""

    is_allowed: bool
    state: CircuitState
    failures: int


class CircuitStore(abc.ABC):
    """Where circuit states live. Every method is one atomic step."""

    @abc.abstractmethod
    async def admit(self, key: str, *, now: float, probe_timeout: float) -> Admission: ...

    @abc.abstractmethod
    async def record_success(self, key: str) -> None: ...

    @abc.abstractmethod
    async def record_failure(
        self, key: str, *, now: float, failure_threshold: int, open_seconds: float, expiry_seconds: int
    ) -> CircuitState: ...

    @abc.abstractmethod
    async def state(self, key: str, *, now: float) -> CircuitState: ...


@dataclass(slots=True)
class _MemoryCircuit:
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    open_until: float = 0.0
    probe_until: float = 0.0


class MemoryCircuitStore(CircuitStore):
    """One process's circuits, for unit use and for tools that run without Redis."""

    def __init__(self) -> None:
        self._circuits: dict[str, _MemoryCircuit] = {}

    async def admit(self, key: str, *, now: float, probe_timeout: float) -> Admission:
        circuit = self._circuits.get(key)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return Admission(True, CircuitState.CLOSED, circuit.failures if circuit else 0)
        if circuit.state is CircuitState.OPEN and now < circuit.open_until:
            return Admission(False, CircuitState.OPEN, circuit.failures)
        if circuit.state is CircuitState.HALF_OPEN and now < circuit.probe_until:
            return Admission(False, CircuitState.HALF_OPEN, circuit.failures)
        circuit.state = CircuitState.HALF_OPEN
        circuit.probe_until = now + probe_timeout
        return Admission(True, CircuitState.HALF_OPEN, circuit.failures)

    async def record_success(self, key: str) -> None:
        self._circuits.pop(key, None)

    async def record_failure(
        self, key: str, *, now: float, failure_threshold: int, open_seconds: float, expiry_seconds: int
    ) -> CircuitState:
        circuit = self._circuits.setdefault(key, _MemoryCircuit())
        circuit.failures += 1
        if circuit.state is CircuitState.HALF_OPEN or (
            circuit.state is CircuitState.CLOSED and circuit.failures >= failure_threshold
        ):
            circuit.state = CircuitState.OPEN
            circuit.open_until = now + open_seconds
            circuit.probe_until = 0.0
        return circuit.state

    async def state(self, key: str, *, now: float) -> CircuitState:
        circuit = self._circuits.get(key)
        return circuit.state if circuit else CircuitState.CLOSED


# A circuit is a hash {state, failures, open_until, probe_until}; no key means closed with no failures.
_ADMIT_SCRIPT = lua_source("chat/lua/circuit_admit.lua")

_FAILURE_SCRIPT = lua_source("chat/lua/circuit_failure.lua")


class RedisCircuitStore(CircuitStore):
    """Circuits in Redis, shared by every process. ``key`` arguments are full Redis keys."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._admit = client.register_script(_ADMIT_SCRIPT)
        self._failure = client.register_script(_FAILURE_SCRIPT)

    async def admit(self, key: str, *, now: float, probe_timeout: float) -> Admission:
        is_allowed, state, failures = await self._admit(keys=[key], args=[repr(now), repr(probe_timeout)])
        return Admission(bool(is_allowed), CircuitState(int(state)), int(failures))

    async def record_success(self, key: str) -> None:
        await self.client.delete(key)

    async def record_failure(
        self, key: str, *, now: float, failure_threshold: int, open_seconds: float, expiry_seconds: int
    ) -> CircuitState:
        state = await self._failure(keys=[key], args=[repr(now), failure_threshold, repr(open_seconds), expiry_seconds])
        return CircuitState(int(state))

    async def state(self, key: str, *, now: float) -> CircuitState:
        # (redis-py types its asyncio replies as ``Awaitable | reply``, shared with the sync client)
        state, open_until = await cast("Awaitable[list[bytes | None]]", self.client.hmget(key, ["state", "open_until"]))
        if state is None:
            return CircuitState.CLOSED
        current = CircuitState(int(state))
        if current is CircuitState.OPEN and now >= float(open_until or 0):
            return CircuitState.HALF_OPEN  # the next admission will be the probe
        return current


class CircuitBreaker:
    """Decides whether a target may be called, and learns from how calls went.

    ``closed_cache_seconds`` lets a process skip Redis for a circuit it saw closed and clean that
    recently: it trades that much delay in noticing another process's opened circuit for one
    Redis round trip less per request. Any failure seen here drops the cached view at once. When
    that view expires, calls that come while one is asking the store share its answer if it is
    clean: under load a busy event loop takes milliseconds to get a reply back, and a generation
    worker with 200 turns in flight sent ~50 admissions a second for one target instead of one.

    The store gets ``store_timeout_seconds`` per call; when it fails or is slow, the breaker lets
    calls through and leaves the store alone for ``store_retry_seconds``, so that an outage of
    Redis costs chat answers neither errors nor latency.
    """

    def __init__(
        self,
        store: CircuitStore | None = None,
        *,
        policy: CircuitPolicy | None = None,
        clock: Callable[[], float] = time.time,
        closed_cache_seconds: float = 0.0,
        store_timeout_seconds: float = 0.25,
        store_retry_seconds: float = 1.0,
    ) -> None:
        self.store = store or MemoryCircuitStore()
        self.policy = policy or CircuitPolicy()
        self.clock = clock
        self.closed_cache_seconds = closed_cache_seconds
        self.store_timeout_seconds = store_timeout_seconds
        self.store_retry_seconds = store_retry_seconds
        self._clean_until: dict[str, float] = {}
        self._asking: dict[str, asyncio.Future[Admission | None]] = {}  # store admissions under way
        self._store_down_until = 0.0

    async def _call_store(self, key: str, operation: Callable[[], Awaitable[T]]) -> T | None:
        """``operation()``'s result, or None when the store is failing (then logged, and rested)."""
        if time.monotonic() < self._store_down_until:
            return None
        try:
            async with asyncio.timeout(self.store_timeout_seconds):
                return await operation()
        except (RedisError, OSError, TimeoutError) as error:
            self._store_down_until = time.monotonic() + self.store_retry_seconds
            logger.warning("circuit_store_unavailable", key=key, error=repr(error))
            return None

    async def admit(self, key: str) -> Admission:
        now = self.clock()
        if self._clean_until.get(key, 0.0) > now:
            return _CLEAN
        asking = self._asking.get(key)
        if asking is not None:
            shared = await asyncio.shield(asking)
            # Only a clean answer holds for this call too: a half-open circuit's probe is granted
            # to one call, and anything else is asked again.
            if shared is not None and shared.state is CircuitState.CLOSED and not shared.failures:
                return _CLEAN
        return await self._admit_from_store(key, now)

    async def _admit_from_store(self, key: str, now: float) -> Admission:
        asking = None
        if self.closed_cache_seconds and key not in self._asking:
            asking = self._asking[key] = asyncio.get_running_loop().create_future()
        admission = None
        probe_timeout = self.policy.probe_timeout_seconds
        try:
            admission = await self._call_store(key, lambda: self.store.admit(key, now=now, probe_timeout=probe_timeout))
        finally:
            if asking is not None:
                del self._asking[key]
                asking.set_result(admission)
        if admission is None:
            return _CLEAN
        if self.closed_cache_seconds and admission.state is CircuitState.CLOSED and not admission.failures:
            self._clean_until[key] = now + self.closed_cache_seconds
        return admission

    async def record_success(self, key: str, admission: Admission) -> CircuitState:
        if admission.state is CircuitState.CLOSED and not admission.failures:
            return CircuitState.CLOSED  # nothing to reset: skip the round trip
        await self._call_store(key, lambda: self.store.record_success(key))
        return CircuitState.CLOSED

    async def record_failure(self, key: str, *, retry_after: float | None = None) -> CircuitState:
        self._clean_until.pop(key, None)
        policy = self.policy
        open_seconds = max(policy.cooldown_seconds, retry_after or 0.0)
        state = await self._call_store(
            key,
            lambda: self.store.record_failure(
                key,
                now=self.clock(),
                failure_threshold=policy.failure_threshold,
                open_seconds=open_seconds,
                expiry_seconds=math.ceil(open_seconds + policy.probe_timeout_seconds) + _KEY_EXPIRY_MARGIN_SECONDS,
            ),
        )
        return CircuitState.CLOSED if state is None else state

    async def state(self, key: str) -> CircuitState:
        return await self.store.state(key, now=self.clock())


_CLEAN = Admission(is_allowed=True, state=CircuitState.CLOSED, failures=0)
