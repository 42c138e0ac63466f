"""Routes: failover before the first token on every fault kind, never after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest
from prometheus_client import REGISTRY

from chat.mock_server import ANSWER_TEXT
from chat.providers.base import (
    BadRequest,
    ChatRequest,
    Delta,
    RateLimited,
    StreamEvent,
    StreamInterrupted,
    Timeout,
    Unavailable,
    collect,
)
from chat.providers.circuit import CircuitBreaker, CircuitPolicy
from chat.providers.local import LocalProvider
from chat.providers.openai_compat import OpenAICompatProvider
from chat.providers.routing import ProviderRoute, Target

HELLO = [{"role": "user", "content": "Hello there"}]
TWENTY_TOKENS = " ".join(ANSWER_TEXT.split()[:20])


def openai_target(name: str, base_url: str, *, timeout: float = 2.0) -> Target:
    provider = OpenAICompatProvider(base_url=base_url, model="mock-model", timeout=timeout)
    return Target(name=name, provider=provider, circuit_key=f"test:{name}")


def route_of(*targets: Target, failure_threshold: int = 5) -> ProviderRoute:
    return ProviderRoute(
        list(targets), breaker=CircuitBreaker(policy=CircuitPolicy(failure_threshold=failure_threshold))
    )


async def drain(events: AsyncIterator[StreamEvent], *, into: list[str]) -> None:
    async for event in events:
        if isinstance(event, Delta):
            into.append(event.text)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


FAILOVER_FAULTS = ["429", "500", "hang", "refused"]


@pytest.mark.parametrize("mode", ["stream", "complete"], ids=["stream_case", "complete_case"])
@pytest.mark.parametrize("fault", FAILOVER_FAULTS, ids=[f"{fault}_case" for fault in FAILOVER_FAULTS])
async def test_fails_over_to_the_next_target_before_the_first_token(mock_llms, refused_url, fault, mode):
    first, second = mock_llms[0], mock_llms[1]
    if fault != "refused":
        first.configure(fault=fault, hang_seconds=5)
    first_url = f"{refused_url}/v1" if fault == "refused" else first.base_url
    route = route_of(openai_target("first", first_url, timeout=0.3), openai_target("second", second.base_url))
    outcome = {"429": "rate_limited", "500": "unavailable", "hang": "timeout", "refused": "unavailable"}[fault]
    failover_labels = {"provider": "openai", "target": "first", "outcome": outcome}
    failovers_before = metric("parley_provider_failovers_total", **failover_labels)
    request = ChatRequest(messages=HELLO)

    completion = await (collect(route.stream(request)) if mode == "stream" else route.complete(request))
    await route.aclose()

    assert completion.text == TWENTY_TOKENS
    assert completion.usage.target == "second"
    assert completion.usage.failovers == 1
    assert first.count() == (0 if fault == "refused" else 1)
    assert second.count() == 1
    assert metric("parley_provider_failovers_total", **failover_labels) == failovers_before + 1


async def test_no_retry_after_the_first_token(mock_llms):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(fault="drop", fault_after=3)
    route = route_of(openai_target("first", first.base_url), openai_target("second", second.base_url))
    received: list[str] = []

    with pytest.raises(StreamInterrupted) as caught:
        await drain(route.stream(ChatRequest(messages=HELLO)), into=received)
    await route.aclose()

    assert "".join(received) == "The quick brown"
    assert caught.value.text == "The quick brown"
    assert isinstance(caught.value.cause, Unavailable)
    assert caught.value.target == "first"
    assert caught.value.failovers == 0
    assert caught.value.is_retryable is False
    assert first.count() == 1
    assert second.count() == 0


async def test_a_stall_after_the_first_token_is_a_terminal_timeout(mock_llms):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(fault="stall", fault_after=2, hang_seconds=5)
    route = route_of(openai_target("first", first.base_url, timeout=0.3), openai_target("second", second.base_url))
    received: list[str] = []

    with pytest.raises(StreamInterrupted) as caught:
        await drain(route.stream(ChatRequest(messages=HELLO)), into=received)
    await route.aclose()

    assert "".join(received) == "The quick"
    assert isinstance(caught.value.cause, Timeout)
    assert second.count() == 0


async def test_a_bad_request_is_not_retried_elsewhere(mock_llms):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(fault="400")
    route = route_of(openai_target("first", first.base_url), openai_target("second", second.base_url))

    with pytest.raises(BadRequest) as caught:
        await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert caught.value.target == "first"
    assert second.count() == 0


async def test_every_target_failing_raises_the_last_error_naming_all(mock_llms):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(fault="500")
    second.configure(fault="429", retry_after=3)
    route = route_of(openai_target("first", first.base_url), openai_target("second", second.base_url))

    with pytest.raises(RateLimited) as caught:
        await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert caught.value.target == "second"
    assert caught.value.failovers == 1
    assert caught.value.retry_after == 3.0
    assert caught.value.message.endswith("(all targets failed — first: unavailable; second: rate_limited)")


async def test_the_local_responder_backs_up_a_dead_server(refused_url):
    route = ProviderRoute(
        [
            openai_target("remote", f"{refused_url}/v1"),
            Target(name="local", provider=LocalProvider(seconds_per_word=0)),
        ]
    )

    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert completion.usage.target == "local"
    assert completion.usage.provider == "local"
    assert completion.usage.failovers == 1
    assert "no knowledge to answer from" in completion.text


async def test_route_timeout_bounds_the_wait_for_the_first_token(mock_llms):
    first, second = mock_llms[0], mock_llms[1]
    first.configure(ttft=10.0)
    route = ProviderRoute(
        [openai_target("first", first.base_url, timeout=30), openai_target("second", second.base_url)],
        first_token_timeout=1.0,  # generous: the second target must also answer within it on a busy machine
    )

    completion = await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert completion.usage.target == "second"


async def test_success_is_counted_with_tokens(mock_llm):
    route = route_of(openai_target("counted", mock_llm.base_url))
    labels = {"provider": "openai", "target": "counted"}
    requests_before = metric("parley_provider_requests_total", **labels, outcome="ok")
    tokens_before = metric("parley_provider_completion_tokens_total", **labels)

    await collect(route.stream(ChatRequest(messages=HELLO)))
    await route.aclose()

    assert metric("parley_provider_requests_total", **labels, outcome="ok") == requests_before + 1
    assert metric("parley_provider_completion_tokens_total", **labels) == tokens_before + 20
    assert metric("parley_provider_time_to_first_token_seconds_count", **labels) >= 1.0


async def test_a_consumer_that_stops_early_releases_the_upstream_at_once(mock_llm):
    mock_llm.configure(tokens_per_second=50, answer_tokens=100)
    route = route_of(openai_target("early", mock_llm.base_url))
    labels = {"provider": "openai", "target": "early", "outcome": "cancelled"}
    cancelled_before = metric("parley_provider_requests_total", **labels)
    received: list[str] = []

    async with aclosing(route.stream(ChatRequest(messages=HELLO))) as events:
        async for event in events:
            if isinstance(event, Delta):
                received.append(event.text)
            if len(received) == 2:
                break
    for _ in range(100):  # the mock notices the closed connection on its next write
        if mock_llm.state.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    in_flight = mock_llm.state.in_flight
    await route.aclose()

    assert received == ["The", " quick"]
    assert metric("parley_provider_requests_total", **labels) == cancelled_before + 1
    assert in_flight == 0
