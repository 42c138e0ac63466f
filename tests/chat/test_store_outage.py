"""Redis unreachable: every door answers 503 with Retry-After in the API's error shape — never a
500 — and keeps nothing (before: 500 ``internal_error`` from the tenant resolution)."""

from __future__ import annotations

import json

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from django.test import Client
from django_tenants.utils import tenant_context

from chat.models import Conversation, Message

pytestmark = pytest.mark.slow


def _unreachable() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)


def _unreachable_async() -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)


def _stored(live) -> tuple[int, int]:
    with tenant_context(live["tenant"]):
        return Conversation.objects.count(), Message.objects.count()


def _assert_retry_later(status: int, headers, body: dict) -> None:
    assert status == 503
    assert int(headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "store_unavailable"
    assert body["error"]["type"] == "api_error"


def test_rest_answers_503_while_redis_is_unreachable(live, django_db_blocker, monkeypatch):
    from tenants import resolution

    with django_db_blocker.unblock():
        before = _stored(live)
        monkeypatch.setattr(resolution, "get_redis", _unreachable)
        response = Client().post(
            f"/api/v1/conversations/{live['conversation'].pk}/messages/",
            {"content": "How are refunds paid?"},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {live['raw']}",
        )
        monkeypatch.undo()
        after = _stored(live)

    _assert_retry_later(response.status_code, response, response.json())
    assert after == before


def test_the_edge_answers_503_while_redis_is_unreachable(live, django_db_blocker, monkeypatch):
    from chat.transports import openai_edge
    from config.asgi import application

    async def post():
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api.localhost") as client:
            return await client.post(
                "/v1/chat/completions",
                content=json.dumps(
                    {"model": live["bot"].public_id, "messages": [{"role": "user", "content": "How are refunds paid?"}]}
                ).encode(),
                headers={"Authorization": f"Bearer {live['raw']}", "Content-Type": "application/json"},
                timeout=30,
            )

    with django_db_blocker.unblock():
        before = _stored(live)
        monkeypatch.setattr(openai_edge, "get_loop_redis", _unreachable_async)
        response = async_to_sync(post)()
        monkeypatch.undo()
        after = _stored(live)

    _assert_retry_later(response.status_code, response.headers, response.json())
    assert after == before
