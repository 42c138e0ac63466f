"""Fixtures for tests that run whole turns: a real generation worker (asyncio, own thread) and a
committed bot with knowledge. Import them into a test module to use them."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from django.conf import settings
from django_tenants.utils import tenant_context

from chat.generation import GenerationWorker
from chat.models import Bot
from chat.providers.base import ChatRequest, Provider, Unavailable
from chat.providers.local import LocalProvider
from chat.services import bot_create, bot_delete, conversation_create
from knowledge.models import KnowledgeBase
from knowledge.services import knowledge_base_create
from tenants.models import ApiKey
from tests.factories import ingest_text, make_api_key


def hub_reads(hub, monkeypatch) -> list[list[str]]:
    """The stream keys of each read the hub makes from now on (the list fills as it reads)."""
    reads: list[list[str]] = []
    real_fetch = hub._fetch

    async def counting_fetch(keys):
        reads.append(keys)
        await real_fetch(keys)

    monkeypatch.setattr(hub, "_fetch", counting_fetch)
    return reads


def sse_events(response) -> list[tuple[str, str, dict]]:
    """A Django streaming response's SSE events as (id, type, data), comments skipped."""

    async def read_all() -> bytes:
        return b"".join([chunk async for chunk in response.streaming_content])

    body = async_to_sync(read_all)().decode()
    events = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            events.append((fields["id"], fields["event"], json.loads(fields["data"])))
    return events


class FailingProvider(Provider):
    kind = "failing"

    def stream(self, request: ChatRequest):
        return self._stream()

    async def _stream(self):
        raise Unavailable("upstream is down")
        yield  # pragma: no cover - makes this an async generator


class WorkerThread:
    """A GenerationWorker on its own event loop, as in a `run_generators` process."""

    def __init__(self, route_for, *, claim_idle_ms: int = 60_000) -> None:
        self.route_for = route_for
        self.claim_idle_ms = claim_idle_ms
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as error:  # surfaced by __exit__
            self.error = error
            raise

    async def _run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        worker = GenerationWorker(
            redis=aioredis.Redis.from_url(settings.REDIS_URL),
            concurrency=16,
            route_for=self.route_for,
            claim_idle_ms=self.claim_idle_ms,
        )
        await worker.ensure_group()
        self.ready.set()
        await worker.run(self.stop)

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        if self.error is None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        if self.error is not None:
            raise AssertionError("the generation worker crashed") from self.error


@pytest.fixture
def provider_choice():
    """Tests set ``provider_choice["provider"]`` to change what the worker's routes return."""
    return {"provider": LocalProvider(seconds_per_word=0.0)}


@pytest.fixture
def worker(provider_choice, django_db_blocker, live):
    with django_db_blocker.unblock(), WorkerThread(lambda _config: provider_choice["provider"]) as running:
        yield running


@pytest.fixture
def live(django_db_blocker, tenant_pair):
    """A committed bot with a little knowledge, an API key, and a conversation; removed after."""
    with django_db_blocker.unblock():
        api_key, raw = make_api_key(tenant_pair.a, scopes=["chat"])
        with tenant_context(tenant_pair.a):
            kb = knowledge_base_create(name=f"live-handbook-{api_key.pk}")
            ingest_text(
                kb,
                "Returns policy",
                "Customers may return any item within 30 days of delivery for a full refund. "
                "Refunds are paid to the original card within five working days.",
            )
            bot = bot_create(name="Support", system_prompt="Answer from the handbook.", knowledge_bases=[kb.pk])
            conversation = conversation_create(bot=bot, end_user_kind="api", end_user_id=f"key:{api_key.pk}")
        try:
            yield {"tenant": tenant_pair.a, "raw": raw, "bot": bot, "conversation": conversation, "kb": kb}
        finally:
            with tenant_context(tenant_pair.a):
                bot_delete(bot=Bot.objects.get(pk=bot.pk))
                KnowledgeBase.objects.filter(name__startswith="live-handbook-").delete()
            ApiKey.objects.filter(pk=api_key.pk).delete()


@pytest.fixture
def routed_worker(django_db_blocker, live):
    """A generation worker that builds each bot's real provider route (chat.providers.registry)."""
    from chat.providers.registry import build_route

    with django_db_blocker.unblock(), WorkerThread(build_route) as running:
        yield running
