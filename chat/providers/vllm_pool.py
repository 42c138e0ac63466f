"""A pool of vLLM replicas serving one model, routed by their live load and by conversation.

A background task polls every replica's ``/health`` and Prometheus ``/metrics`` each
``scrape_interval`` seconds. Each request goes to the replica with the lowest load score::

    score = running + 4·waiting + 4·kv_cache_usage + requests this process sent since the scrape

(waiting requests are queued, so they cost more than running ones; the last term keeps a burst
between two scrapes from piling onto one replica). A request with a conversation id prefers that
conversation's replica — chosen by rendezvous hashing, so it stays put while the replica set does
not change — because vLLM's prefix cache there already holds the conversation's earlier turns.
It leaves that replica only when the replica is dead, nearly out of KV cache, or more than
``affinity_slack`` score points busier than the best one.

A replica that fails a health check, or a request with a connection error or 5xx, is dead: it
gets no requests until a health check passes again (no sooner than one scrape interval later).
A request that fails on one replica before its first token is sent to another, except after a
timeout, which has already spent the caller's patience.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from collections.abc import AsyncGenerator
from contextlib import suppress
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chat.providers import metrics
from chat.providers.base import (
    ChatRequest,
    Completion,
    Provider,
    ProviderError,
    RateLimited,
    StreamEvent,
    Timeout,
    Unavailable,
    Usage,
)
from chat.providers.openai_compat import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    OpenAICompatProvider,
    openai_compat_provider,
    shared_ssl_context,
)
from config.logging import get_logger
from tenants.outbound import guarded_async_transport

logger = get_logger(__name__)

RUNNING_GAUGE = "vllm:num_requests_running"
WAITING_GAUGE = "vllm:num_requests_waiting"
KV_CACHE_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # vLLM ≥ 0.10, older
_WANTED = frozenset((RUNNING_GAUGE, WAITING_GAUGE, *KV_CACHE_GAUGES))

WAITING_WEIGHT = 4.0
KV_CACHE_WEIGHT = 4.0
DEFAULT_AFFINITY_SLACK = 8.0
DEFAULT_OVERLOAD_KV_CACHE_USAGE = 0.95  # beyond this vLLM starts preempting: don't hold a conversation there
DEFAULT_SCRAPE_INTERVAL_SECONDS = 1.0
DEFAULT_PROBE_TIMEOUT_SECONDS = 1.0
DEFAULT_MAX_REPLICA_ATTEMPTS = 2


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0


def parse_vllm_metrics(text: str) -> ReplicaLoad:
    """The load gauges from a vLLM ``/metrics`` page (summed over engines; KV usage: the fullest).

    Only the lines of the three gauges are parsed: a vLLM page has hundreds of histogram lines
    that would cost the scraper far more than the answer is worth.
    """
    kept = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[2] in _WANTED:
                kept.append(line)
        elif line.split("{", 1)[0].split(" ", 1)[0] in _WANTED:
            kept.append(line)
    running = waiting = 0.0
    kv_cache_usage: float | None = None
    found = False
    for family in text_string_to_metric_families("\n".join(kept) + "\n"):
        for sample in family.samples:
            found = True
            if sample.name == RUNNING_GAUGE:
                running += sample.value
            elif sample.name == WAITING_GAUGE:
                waiting += sample.value
            else:
                kv_cache_usage = max(kv_cache_usage or 0.0, sample.value)
    if not found:
        raise ValueError("no vLLM load gauges on the metrics page")
    return ReplicaLoad(running=running, waiting=waiting, kv_cache_usage=kv_cache_usage or 0.0)


def rendezvous_weight(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


def server_root(url: str) -> str:
    """``http://host:8000`` from any of ``http://host:8000``, ``…/``, ``…/v1``."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(slots=True)
class Replica:
    url: str
    provider: OpenAICompatProvider
    is_healthy: bool = True
    load: ReplicaLoad = dataclasses.field(default_factory=ReplicaLoad)
    sent_since_scrape: int = 0
    in_flight: int = 0
    dead_until: float = 0.0
    last_error: str | None = None

    @property
    def score(self) -> float:
        load = self.load
        return (
            load.running
            + WAITING_WEIGHT * load.waiting
            + KV_CACHE_WEIGHT * load.kv_cache_usage
            + self.sent_since_scrape
        )


class VllmPoolProvider(Provider):
    """N vLLM endpoints serving one model (see the module docstring for the routing rules)."""

    kind = "vllm_pool"

    def __init__(
        self,
        *,
        endpoints: list[str],
        model: str,
        api_key: str | None = None,
        name: str = "vllm_pool",
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        scrape_interval: float = DEFAULT_SCRAPE_INTERVAL_SECONDS,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
        affinity_slack: float = DEFAULT_AFFINITY_SLACK,
        overload_kv_cache_usage: float = DEFAULT_OVERLOAD_KV_CACHE_USAGE,
        max_replica_attempts: int = DEFAULT_MAX_REPLICA_ATTEMPTS,
        min_dead_seconds: float | None = None,
        client: str = "aiohttp",
    ) -> None:
        if not endpoints:
            raise ValueError("A vLLM pool needs at least one endpoint.")
        self.model = model
        self.name = name
        self.scrape_interval = scrape_interval
        self.probe_timeout = probe_timeout
        self.affinity_slack = affinity_slack
        self.overload_kv_cache_usage = overload_kv_cache_usage
        self.max_replica_attempts = max_replica_attempts
        # A replica that failed a request stays dead at least this long, whatever /health says.
        self.min_dead_seconds = scrape_interval if min_dead_seconds is None else min_dead_seconds
        self.replicas = [
            Replica(
                url=server_root(url),
                provider=openai_compat_provider(
                    client=client,
                    base_url=f"{server_root(url)}/v1",
                    api_key=api_key,
                    model=model,
                    timeout=timeout,
                    connect_timeout=connect_timeout,
                    provider_kind=self.kind,
                ),
            )
            for url in endpoints
        ]
        self._turn = 0
        self._refreshed_at = -math.inf
        self._scraper: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        for replica in self.replicas:
            metrics.POOL_ENDPOINT_HEALTHY.labels(self.name, replica.url).set(1)

    def __repr__(self) -> str:
        return f"VllmPoolProvider({[replica.url for replica in self.replicas]}, model={self.model!r})"

    # -- choosing a replica ---------------------------------------------------------------------

    def choose(self, affinity_key: str | None = None, *, exclude: frozenset[str] = frozenset()) -> Replica:
        """The replica for the next request; :class:`Unavailable` when none is alive."""
        healthy = [replica for replica in self.replicas if replica.is_healthy and replica.url not in exclude]
        if not healthy:
            raise Unavailable(f"No healthy replica in the vLLM pool {self.name}.")
        # Rotating the starting point spreads requests over equally loaded replicas.
        self._turn = (self._turn + 1) % len(healthy)
        best = min(healthy[self._turn :] + healthy[: self._turn], key=lambda replica: replica.score)
        if affinity_key:
            preferred = max(healthy, key=lambda replica: rendezvous_weight(affinity_key, replica.url))
            if (
                preferred.load.kv_cache_usage < self.overload_kv_cache_usage
                and preferred.score <= best.score + self.affinity_slack
            ):
                return preferred
        return best

    # -- answering ------------------------------------------------------------------------------

    async def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        self.ensure_scraping()
        tried: set[str] = set()
        while True:
            replica = self.choose(request.affinity_key, exclude=frozenset(tried))
            tried.add(replica.url)
            replica.sent_since_scrape += 1
            replica.in_flight += 1
            events = replica.provider.stream(request)
            try:
                first = await anext(events)
            except StopAsyncIteration:
                error: ProviderError = Unavailable(f"The replica {replica.url} ended its answer before it began.")
            except ProviderError as failure:
                error = failure
            except BaseException:
                replica.in_flight -= 1
                await events.aclose()
                raise
            else:
                break
            replica.in_flight -= 1
            await events.aclose()
            self._request_failed(replica, error)
            if self._may_retry(error, tried):
                continue
            raise error

        try:
            event: StreamEvent = first
            while True:
                if isinstance(event, Usage):
                    event = dataclasses.replace(event, endpoint=replica.url)
                yield event
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    break
        except ProviderError as error:
            self._request_failed(replica, error)
            raise
        finally:
            replica.in_flight -= 1
            await events.aclose()

    async def complete(self, request: ChatRequest) -> Completion:
        """A non-streamed answer from the chosen replica, under the same retry rules as :meth:`stream`."""
        self.ensure_scraping()
        tried: set[str] = set()
        while True:
            replica = self.choose(request.affinity_key, exclude=frozenset(tried))
            tried.add(replica.url)
            replica.sent_since_scrape += 1
            replica.in_flight += 1
            try:
                completion = await replica.provider.complete(request)
            except ProviderError as error:
                self._request_failed(replica, error)
                if self._may_retry(error, tried):
                    continue
                raise
            finally:
                replica.in_flight -= 1
            return dataclasses.replace(completion, usage=dataclasses.replace(completion.usage, endpoint=replica.url))

    def _may_retry(self, error: ProviderError, tried: set[str]) -> bool:
        """Another replica of the same model may well answer; after a timeout there is no time left to try."""
        if not isinstance(error, Unavailable | RateLimited) or len(tried) >= self.max_replica_attempts:
            return False
        return any(replica.is_healthy and replica.url not in tried for replica in self.replicas)

    def _request_failed(self, replica: Replica, error: ProviderError) -> None:
        if isinstance(error, Unavailable | Timeout):
            # /health often passes while requests fail (a wedged engine): one good check must not revive it.
            replica.dead_until = time.monotonic() + self.min_dead_seconds
            self._set_health(replica, is_healthy=False, reason=error.message)

    def _set_health(self, replica: Replica, *, is_healthy: bool, reason: str | None = None) -> None:
        if not is_healthy:
            replica.last_error = reason
        if replica.is_healthy != is_healthy:
            logger.warning(
                "vllm_replica_alive" if is_healthy else "vllm_replica_dead",
                pool=self.name,
                endpoint=replica.url,
                reason=reason,
            )
        replica.is_healthy = is_healthy
        metrics.POOL_ENDPOINT_HEALTHY.labels(self.name, replica.url).set(int(is_healthy))

    # -- scraping -------------------------------------------------------------------------------

    def ensure_scraping(self) -> None:
        """Start the background scraper on the running loop, unless it is already running there."""
        loop = asyncio.get_running_loop()
        if self._scraper is not None and not self._scraper.done() and self._scraper.get_loop() is loop:
            return
        self._http = None  # a client belongs to the loop that made it
        self._scraper = loop.create_task(self._scrape_forever(), name=f"vllm-pool-scraper:{self.name}")

    async def _scrape_forever(self) -> None:
        while True:
            # Counted from the last refresh, whoever made it: no scrape right after a manual one.
            await asyncio.sleep(max(0.0, self._refreshed_at + self.scrape_interval - time.monotonic()))
            await self.refresh()

    async def refresh(self) -> None:
        """Probe every replica once: health, then load."""
        self._refreshed_at = time.monotonic()
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.probe_timeout, transport=guarded_async_transport(verify=shared_ssl_context())
            )
        await asyncio.gather(*(self._probe(replica, self._http) for replica in self.replicas))

    async def _probe(self, replica: Replica, http: httpx.AsyncClient) -> None:
        health, page = await asyncio.gather(
            http.get(f"{replica.url}/health"), http.get(f"{replica.url}/metrics"), return_exceptions=True
        )
        if isinstance(health, httpx.Response) and health.status_code == 200:
            if not replica.is_healthy and time.monotonic() < replica.dead_until:
                return
            if isinstance(page, httpx.Response) and page.status_code == 200:
                try:
                    replica.load = parse_vllm_metrics(page.text)
                    replica.sent_since_scrape = 0
                except ValueError as error:
                    logger.warning("vllm_metrics_unreadable", pool=self.name, endpoint=replica.url, error=str(error))
            self._set_health(replica, is_healthy=True)
        else:
            reason = f"HTTP {health.status_code}" if isinstance(health, httpx.Response) else repr(health)
            self._set_health(replica, is_healthy=False, reason=f"health check failed: {reason}")

    async def aclose(self) -> None:
        scraper, self._scraper = self._scraper, None
        if scraper is not None:
            # A scraper left on a loop that has since closed cannot be awaited, nor even cancelled.
            with suppress(RuntimeError):
                scraper.cancel()
            if scraper.get_loop() is asyncio.get_running_loop():
                with suppress(asyncio.CancelledError):
                    await scraper
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for replica in self.replicas:
            await replica.provider.aclose()
