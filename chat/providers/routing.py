"""Provider routes: an ordered list of targets, failover before the first token, circuit breakers.

A bot's route is tried in order. A target whose circuit is open is skipped. A target that fails
*before its first event* with a retryable error (rate limited, unavailable, timed out, or a 4xx
that blames the target) is recorded against its circuit and the next target is tried. Once an
event has been passed on, the answer belongs to that target: if it breaks, the route raises
:class:`~chat.providers.base.StreamInterrupted` and never retries, because the caller has
already shown part of an answer that another model would not continue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from chat.providers import metrics
from chat.providers.base import (
    ChatRequest,
    Completion,
    Delta,
    Provider,
    ProviderError,
    StreamEvent,
    StreamInterrupted,
    Timeout,
    Unavailable,
    Usage,
)
from chat.providers.circuit import Admission, CircuitBreaker, CircuitState


@dataclass(frozen=True, slots=True)
class Target:
    """One step of a route. ``name`` labels metrics and usage; ``circuit_key`` is its breaker's
    key, or None for a target that cannot fail (the local responder) and needs no breaker."""

    name: str
    provider: Provider
    circuit_key: str | None = None


_ALWAYS = Admission(is_allowed=True, state=CircuitState.CLOSED, failures=0)


class ProviderRoute(Provider):
    """A Provider that answers through the first healthy target of an ordered list."""

    kind = "route"

    def __init__(
        self,
        targets: list[Target],
        *,
        breaker: CircuitBreaker | None = None,
        first_token_timeout: float | None = None,
    ) -> None:
        if not targets:
            raise ValueError("A route needs at least one target.")
        self.targets = list(targets)
        self.breaker = breaker or CircuitBreaker()
        self.first_token_timeout = first_token_timeout

    def __repr__(self) -> str:
        return f"ProviderRoute({[target.name for target in self.targets]})"

    async def aclose(self) -> None:
        for target in self.targets:
            await target.provider.aclose()

    # -- streaming ------------------------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        failures: list[ProviderError] = []
        for target in self.targets:
            admission = await self._admit(target)
            if admission is None:
                continue
            events = target.provider.stream(request)
            started = time.perf_counter()
            try:
                first = await self._first_event(events, request)
            except ProviderError as error:
                await events.aclose()
                if await self._attempt_failed(target, admission, error, failures):
                    continue
                raise
            except BaseException:
                await events.aclose()
                raise
            # aclosing: a consumer that stops early closes the relay (and the connection) now, not at GC.
            relay = self._relay(target, admission, events, first, started, failovers=len(failures))
            async with aclosing(relay):
                async for event in relay:
                    yield event
            return
        raise self._exhausted(failures)

    async def _first_event(self, events: AsyncGenerator[StreamEvent, None], request: ChatRequest) -> StreamEvent:
        timeout = request.timeout or self.first_token_timeout
        try:
            # Not around a yield: a timeout here cancels only this wait for the first event.
            async with asyncio.timeout(timeout):
                return await anext(events)
        except StopAsyncIteration:
            raise Unavailable("The provider ended its answer before it began.") from None
        except TimeoutError:
            waited = f"within {timeout:g} s" if timeout else "in time"
            raise Timeout(f"No answer began {waited}.") from None

    async def _relay(
        self,
        target: Target,
        admission: Admission,
        events: AsyncGenerator[StreamEvent, None],
        first: StreamEvent,
        started: float,
        *,
        failovers: int,
    ) -> AsyncGenerator[StreamEvent, None]:
        labels = (target.provider.kind, target.name)
        streamed: list[str] = []
        first_token_at: float | None = None
        usage: Usage | None = None
        event: StreamEvent = first
        try:
            while True:
                if isinstance(event, Delta):
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        metrics.TIME_TO_FIRST_TOKEN.labels(*labels).observe(first_token_at - started)
                    streamed.append(event.text)
                elif isinstance(event, Usage):
                    usage = event = dataclasses.replace(event, target=target.name, failovers=failovers)
                yield event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
            if usage is None:
                raise Unavailable("The provider's answer ended without its usage report.")
        except ProviderError as error:
            metrics.REQUESTS.labels(*labels, "interrupted").inc()
            if error.is_retryable:
                await self._record_failure(target, error)
            interrupted = StreamInterrupted(
                f"The answer from {target.name} broke off after it had begun: {error.message}",
                cause=error,
                text="".join(streamed),
            )
            interrupted.target = target.name
            interrupted.failovers = failovers
            raise interrupted from error
        except (GeneratorExit, asyncio.CancelledError):
            metrics.REQUESTS.labels(*labels, "cancelled").inc()
            raise
        finally:
            await events.aclose()

        metrics.REQUESTS.labels(*labels, "ok").inc()
        metrics.PROMPT_TOKENS.labels(*labels).inc(usage.prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(*labels).inc(usage.completion_tokens)
        if first_token_at is not None and usage.completion_tokens > 1:
            per_token = (time.perf_counter() - first_token_at) / (usage.completion_tokens - 1)
            metrics.TIME_PER_OUTPUT_TOKEN.labels(*labels).observe(per_token)
        await self._record_success(target, admission)

    # -- whole answers --------------------------------------------------------------------------

    async def complete(self, request: ChatRequest) -> Completion:
        """Same failover rules; every failure is "before the first token", since nothing was shown."""
        failures: list[ProviderError] = []
        for target in self.targets:
            admission = await self._admit(target)
            if admission is None:
                continue
            try:
                completion = await target.provider.complete(request)
            except ProviderError as error:
                if await self._attempt_failed(target, admission, error, failures):
                    continue
                raise
            labels = (target.provider.kind, target.name)
            metrics.REQUESTS.labels(*labels, "ok").inc()
            metrics.PROMPT_TOKENS.labels(*labels).inc(completion.usage.prompt_tokens)
            metrics.COMPLETION_TOKENS.labels(*labels).inc(completion.usage.completion_tokens)
            await self._record_success(target, admission)
            usage = dataclasses.replace(completion.usage, target=target.name, failovers=len(failures))
            return dataclasses.replace(completion, usage=usage)
        raise self._exhausted(failures)

    # -- shared steps ---------------------------------------------------------------------------

    async def _admit(self, target: Target) -> Admission | None:
        if target.circuit_key is None:
            return _ALWAYS
        admission = await self.breaker.admit(target.circuit_key)
        self._set_circuit(target, admission.state)
        if admission.is_allowed:
            return admission
        metrics.REQUESTS.labels(target.provider.kind, target.name, "circuit_open").inc()
        return None

    async def _attempt_failed(
        self, target: Target, admission: Admission, error: ProviderError, failures: list[ProviderError]
    ) -> bool:
        """Record a failure before the first token; true when the next target should be tried."""
        labels = (target.provider.kind, target.name)
        metrics.REQUESTS.labels(*labels, error.outcome).inc()
        error.target = target.name
        error.failovers = len(failures)
        failures.append(error)
        if not error.is_retryable:
            # The target answered; the request was at fault. That is no reason to distrust the target.
            await self._record_success(target, admission)
            return False
        await self._record_failure(target, error)
        if target is not self.targets[-1]:
            metrics.FAILOVERS.labels(*labels, error.outcome).inc()
        return True

    def _set_circuit(self, target: Target, state: CircuitState) -> None:
        metrics.CIRCUIT_STATE.labels(target.provider.kind, target.name).set(int(state))

    async def _record_success(self, target: Target, admission: Admission) -> None:
        if target.circuit_key is not None:
            self._set_circuit(target, await self.breaker.record_success(target.circuit_key, admission))

    async def _record_failure(self, target: Target, error: ProviderError) -> None:
        if target.circuit_key is not None:
            retry_after = getattr(error, "retry_after", None)
            self._set_circuit(target, await self.breaker.record_failure(target.circuit_key, retry_after=retry_after))

    def _exhausted(self, failures: list[ProviderError]) -> ProviderError:
        if not failures:
            return Unavailable(
                "Every provider of this bot is failing and resting; try again shortly.", code="circuit_open"
            )
        last = failures[-1]
        if len(failures) > 1:
            tried = "; ".join(f"{failure.target}: {failure.outcome}" for failure in failures)
            last.message = f"{last.message} (all targets failed — {tried})"
            last.args = (last.message,)
        return last
