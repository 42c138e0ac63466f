"""Channels consumers and Celery tasks run in the right tenant's schema.

These talk to PostgreSQL from other threads (Channels' database thread, the Celery worker), which
cannot see a test transaction, so their data is committed here and removed afterwards.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from celery.contrib.testing.worker import start_worker
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import Client
from django.urls import path
from django_tenants.utils import tenant_context

from config.celery import app as celery_app
from knowledge.models import KnowledgeBase
from tenants.channels import TenantWebsocketMiddleware, tenant_database_sync_to_async
from tenants.models import ApiKey
from tenants.redis import get_redis
from tests.factories import bearer, host_of, make_api_key


@pytest.fixture
def committed(django_db_blocker, tenant_pair):
    """Unblocked database with one knowledge base per tenant, committed; cleaned up after."""
    with django_db_blocker.unblock():
        for tenant in (tenant_pair.a, tenant_pair.b):
            with tenant_context(tenant):
                KnowledgeBase.objects.filter(name__startswith="committed-").delete()
                KnowledgeBase.objects.create(name=f"committed-{tenant.slug}")
        yield tenant_pair
        for tenant in (tenant_pair.a, tenant_pair.b):
            with tenant_context(tenant):
                KnowledgeBase.objects.filter(name__startswith="committed-").delete()
        connection.set_schema_to_public()


class KnowledgeNamesConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        await self.accept()

    async def receive_json(self, content, **kwargs):
        await self.send_json({"names": await self.names()})

    @tenant_database_sync_to_async
    def names(self) -> list[str]:
        return sorted(KnowledgeBase.objects.filter(name__startswith="committed-").values_list("name", flat=True))


websocket_app = TenantWebsocketMiddleware(URLRouter([path("ws/test/", KnowledgeNamesConsumer.as_asgi())]))


def _communicator(host: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(websocket_app, "/ws/test/", headers=[(b"host", host.encode())])


async def test_consumers_of_two_tenants_see_only_their_rows(committed):
    a = _communicator(host_of(committed.a))
    b = _communicator(host_of(committed.b))
    assert (await a.connect(timeout=10))[0]
    assert (await b.connect(timeout=10))[0]

    # Interleave so the shared database thread serves A, B, A, B.
    answers = []
    for communicator in (a, b, a, b):
        await communicator.send_json_to({})
        answers.append(await communicator.receive_json_from(timeout=5))

    assert answers == [
        {"names": ["committed-acme"]},
        {"names": ["committed-globex"]},
        {"names": ["committed-acme"]},
        {"names": ["committed-globex"]},
    ]
    await a.disconnect()
    await b.disconnect()


async def test_websocket_to_unknown_or_suspended_tenant_refused(committed, django_db_blocker):
    from tenants.services import tenant_activate, tenant_suspend

    unknown = _communicator("nobody.localhost")
    connected, code = await unknown.connect(timeout=10)
    assert (connected, code) == (False, 4403)

    with django_db_blocker.unblock():
        await asyncio.to_thread(tenant_suspend, tenant=committed.b)
    try:
        suspended = _communicator(host_of(committed.b))
        connected, code = await suspended.connect(timeout=10)
        assert (connected, code) == (False, 4403)
    finally:
        with django_db_blocker.unblock():
            await asyncio.to_thread(tenant_activate, tenant=committed.b)


# --- Celery ---------------------------------------------------------------------------------------


@celery_app.task(name="tests.record_schema")
def record_schema(marker: str) -> None:
    if connection.schema_name != "public":
        KnowledgeBase.objects.create(name=f"committed-task-{marker}")
    get_redis().set(f"test:schema:{marker}", connection.schema_name)


def _wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the worker")


@pytest.fixture
def celery_worker_thread(committed):
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        yield


@pytest.mark.slow
def test_tasks_run_in_the_schema_they_were_sent_from(committed, celery_worker_thread):
    with tenant_context(committed.a):
        record_schema.delay("from-a")
    with tenant_context(committed.b):
        record_schema.delay("from-b")
    # A task sent from the public schema must not inherit the worker's previous schema.
    connection.set_schema_to_public()
    record_schema.delay("from-public")

    redis = get_redis()
    schemas = {m: _wait_for(lambda m=m: redis.get(f"test:schema:{m}")) for m in ("from-a", "from-b", "from-public")}

    assert schemas == {"from-a": b"t_acme", "from-b": b"t_globex", "from-public": b"public"}
    with tenant_context(committed.a):
        assert set(KnowledgeBase.objects.filter(name__startswith="committed-task").values_list("name", flat=True)) == {
            "committed-task-from-a"
        }
    with tenant_context(committed.b):
        assert set(KnowledgeBase.objects.filter(name__startswith="committed-task").values_list("name", flat=True)) == {
            "committed-task-from-b"
        }


@pytest.mark.slow
def test_api_key_last_used_recorded_by_worker(committed, celery_worker_thread):
    api_key, raw = make_api_key(committed.a)
    try:
        before = datetime.now().astimezone()
        assert Client().get("/api/v1/me/", **bearer(raw)).status_code == 200

        last_used = _wait_for(lambda: ApiKey.objects.get(pk=api_key.pk).last_used_at)

        assert last_used >= before
    finally:
        ApiKey.objects.filter(pk=api_key.pk).delete()
