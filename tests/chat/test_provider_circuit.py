"""Circuit breakers: open after N failures, skip the target, probe once after the cool-down, share state."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from chat.mock_server import ANSWER_TEXT
from chat.providers.base import ChatRequest, Unavailable, collect
from chat.providers.circuit import (
    CircuitBreaker,
    CircuitPolicy,
    CircuitState,
    MemoryCircuitStore,
    RedisCircuitStore,
    circuit_key,
)
from chat.providers.openai_compat import OpenAICompatProvider
from chat.providers.routing import ProviderRoute, Target
from tenants.redis import get_async_redis

HELLO = [{"role": "user", "content": "Hello there"}]
TWENTY_TOKENS = " ".join(ANSWER_TEXT.split()[:20])
KEY = circuit_key("test-target")


@pytest.fixture(params=["memory", "redis"], ids=["memory_case", "redis_case"])
async def store(request):
    if request.param == "memory":
        yield MemoryCircuitStore()
        return
    client = get_async_redis()
    yield RedisCircuitStore(client)
    await client.aclose()


def breaker_with(store, clock, *, failure_threshold: int = 2, cooldown_seconds: float = 30.0) -> CircuitBreaker:
    policy = CircuitPolicy(failure_threshold=failure_threshold, cooldown_seconds=cooldown_seconds)
    return CircuitBreaker(store, policy=policy, clock=clock)


def two_target_route(mock_llms, breaker: CircuitBreaker) -> ProviderRoute:
    targets = [
        Target(
            name=name,
            provider=OpenAICompatProvider(base_url=server.base_url, model="mock-model", timeout=2),
            circuit_key=circuit_key(f"test-{name}"),
        )
        for name, server in (("first", mock_llms[0]), ("second", mock_llms[1]))
    ]
    return ProviderRoute(targets, breaker=breaker)


async def test_opens_after_n_failures_skips_then_probes_after_the_cooldown(mock_llms, store, clock):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(fault="500")
    breaker = breaker_with(store, clock, failure_threshold=2, cooldown_seconds=30)
    route = two_target_route(mock_llms, breaker)
    first_key = route.targets[0].circuit_key

    # Two failures open the circuit; both answers still come from the second target.
    for _ in range(2):
        completion = await collect(route.stream(ChatRequest(messages=HELLO)))
        assert completion.usage.target == "second"
    assert await breaker.state(first_key) is CircuitState.OPEN

    # While open, the first target is not even asked.
    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    assert completion.usage.target == "second"
    assert completion.usage.failovers == 0
    assert first.count() == 2

    # After the cool-down one probe goes through; it succeeds, so the circuit closes.
    first.configure(fault="none")
    clock.advance(30)
    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert completion.usage.target == "first"
    assert completion.text == TWENTY_TOKENS
    assert first.count() == 3
    assert second.count() == 3
    assert await breaker.state(first_key) is CircuitState.CLOSED


async def test_a_failed_probe_opens_the_circuit_again(mock_llms, store, clock):
    first = mock_llms[0]
    first.configure(fault="500")
    breaker = breaker_with(store, clock, failure_threshold=1, cooldown_seconds=10)
    route = two_target_route(mock_llms, breaker)
    first_key = route.targets[0].circuit_key
    await collect(route.stream(ChatRequest(messages=HELLO)))
    assert await breaker.state(first_key) is CircuitState.OPEN

    clock.advance(10)
    await collect(route.stream(ChatRequest(messages=HELLO)))  # the probe, failing
    await collect(route.stream(ChatRequest(messages=HELLO)))  # skipped: open again
    await route.aclose()

    assert first.count() == 2
    assert await breaker.state(first_key) is CircuitState.OPEN


async def test_half_open_admits_a_single_probe(store, clock):
    breaker = breaker_with(store, clock, failure_threshold=1, cooldown_seconds=5)
    await breaker.record_failure(KEY)
    clock.advance(5)

    admissions = await asyncio.gather(*(breaker.admit(KEY) for _ in range(5)))

    assert [admission.is_allowed for admission in admissions].count(True) == 1
    assert {admission.state for admission in admissions} == {CircuitState.HALF_OPEN}


async def test_a_probe_that_never_reports_frees_the_slot(store, clock):
    policy = CircuitPolicy(failure_threshold=1, cooldown_seconds=5, probe_timeout_seconds=20)
    breaker = CircuitBreaker(store, policy=policy, clock=clock)
    await breaker.record_failure(KEY)
    clock.advance(5)
    assert (await breaker.admit(KEY)).is_allowed is True

    clock.advance(19)
    assert (await breaker.admit(KEY)).is_allowed is False
    clock.advance(1)
    assert (await breaker.admit(KEY)).is_allowed is True


async def test_a_long_retry_after_keeps_the_circuit_open(store, clock):
    breaker = breaker_with(store, clock, failure_threshold=1, cooldown_seconds=2)

    await breaker.record_failure(KEY, retry_after=60)

    clock.advance(59)
    assert (await breaker.admit(KEY)).is_allowed is False
    clock.advance(1)
    assert (await breaker.admit(KEY)).is_allowed is True


async def test_a_success_resets_the_count_of_consecutive_failures(store, clock):
    breaker = breaker_with(store, clock, failure_threshold=2)
    await breaker.record_failure(KEY)
    admission = await breaker.admit(KEY)
    assert admission.failures == 1

    await breaker.record_success(KEY, admission)
    await breaker.record_failure(KEY)

    assert await breaker.state(KEY) is CircuitState.CLOSED


async def test_processes_share_circuits_through_redis(clock):
    client_one, client_two = get_async_redis(), get_async_redis()
    one = CircuitBreaker(RedisCircuitStore(client_one), policy=CircuitPolicy(failure_threshold=2), clock=clock)
    two = CircuitBreaker(RedisCircuitStore(client_two), policy=CircuitPolicy(failure_threshold=2), clock=clock)

    await one.record_failure(KEY)
    await two.record_failure(KEY)
    admission = await one.admit(KEY)
    await client_one.aclose()
    await client_two.aclose()

    assert admission.is_allowed is False
    assert admission.state is CircuitState.OPEN


async def test_circuit_keys_are_tenant_scoped_when_asked():
    assert circuit_key("abc") == "parley:circuit:abc"
    assert circuit_key("abc", schema_name="acme") == "t:acme:circuit:abc"


async def test_a_real_short_cooldown_elapses(mock_llms):
    """The same cycle on the real clock: a half-second cool-down keeps the test fast (and not flaky)."""
    first = mock_llms[0]
    first.configure(fault="500")
    breaker = CircuitBreaker(policy=CircuitPolicy(failure_threshold=1, cooldown_seconds=0.5))
    route = two_target_route(mock_llms, breaker)
    await collect(route.stream(ChatRequest(messages=HELLO)))
    await collect(route.stream(ChatRequest(messages=HELLO)))
    assert first.count() == 1

    first.configure(fault="none")
    await asyncio.sleep(0.5)
    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert completion.usage.target == "first"


async def test_redis_down_fails_open_and_fast(refused_url, clock):
    port = int(refused_url.rsplit(":", 1)[1])
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.2)
    breaker = CircuitBreaker(RedisCircuitStore(client), clock=clock, store_timeout_seconds=0.1)
    started = time.monotonic()

    admission = await breaker.admit(KEY)
    state = await breaker.record_failure(KEY)
    again = await breaker.admit(KEY)
    elapsed = time.monotonic() - started
    await client.aclose()

    assert admission.is_allowed is True
    assert state is CircuitState.CLOSED
    assert again.is_allowed is True
    assert elapsed < 0.5  # one timed-out call; then the store is left alone for a while


async def test_every_circuit_open_is_unavailable(mock_llms, clock):
    breaker = breaker_with(MemoryCircuitStore(), clock, failure_threshold=1)
    route = two_target_route(mock_llms, breaker)
    for target in route.targets:
        await breaker.record_failure(target.circuit_key)

    with pytest.raises(Unavailable) as caught:
        await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert caught.value.code == "circuit_open"
    assert mock_llms[0].count() + mock_llms[1].count() == 0


async def test_closed_cache_skips_the_store_until_a_failure(clock):
    class CountingStore(MemoryCircuitStore):
        admits = 0

        async def admit(self, key, *, now, probe_timeout):
            CountingStore.admits += 1
            return await super().admit(key, now=now, probe_timeout=probe_timeout)

    breaker = CircuitBreaker(CountingStore(), clock=clock, closed_cache_seconds=1.0)

    for _ in range(3):
        await breaker.admit(KEY)
    await breaker.record_failure(KEY)
    await breaker.admit(KEY)

    assert CountingStore.admits == 2


async def test_admissions_that_arrive_while_the_store_is_asked_share_a_clean_answer(clock):
    """A busy worker's turns arrive while the first of them waits for Redis: one store call serves
    them all when the circuit is clean — and none when it is half-open, whose probe is one call's."""
    store = RedisCircuitStore(get_async_redis())
    asked = []
    real_admit = store.admit

    async def slow_admit(key, *, now, probe_timeout):
        asked.append(key)
        await asyncio.sleep(0.05)  # a reply late on a loaded event loop
        return await real_admit(key, now=now, probe_timeout=probe_timeout)

    store.admit = slow_admit
    policy = CircuitPolicy(failure_threshold=1, cooldown_seconds=30.0)
    breaker = CircuitBreaker(store, policy=policy, clock=clock, closed_cache_seconds=1.0)
    clean, tripped = circuit_key("test-clean"), circuit_key("test-tripped")

    together = await asyncio.gather(*(breaker.admit(clean) for _ in range(20)))
    await breaker.record_failure(tripped)
    clock.advance(31)  # past the cool-down: half-open, one probe allowed
    probes = await asyncio.gather(*(breaker.admit(tripped) for _ in range(5)))

    assert all(admission.is_allowed for admission in together)
    assert asked.count(clean) == 1
    assert asked.count(tripped) == 5  # each asked for itself
    assert [admission.is_allowed for admission in probes].count(True) == 1
