"""Generation workers sharing the job stream: a long answer is never taken over while its worker
lives (heartbeats), and a dead worker's half-streamed answer is ended and stored as interrupted."""

from __future__ import annotations

import contextlib
import json
import time
import uuid

from django.test import Client
from django_tenants.utils import tenant_context
from redis.exceptions import ResponseError

from chat.memory.persistence import messages_flush
from chat.models import Message
from chat.providers.local import LocalProvider
from chat.streams import JOBS_GROUP, JOBS_STREAM, generation_stream_key
from chat.turn_job import TurnJob
from tenants.redis import get_redis
from tests.chat.turn_fixtures import WorkerThread, sse_events
from tests.factories import bearer


def _events(response) -> list[tuple[str, dict]]:
    return [(event_type, data) for _id, event_type, data in sse_events(response)]


def test_an_answer_longer_than_the_claim_timeout_is_not_taken_over(live, django_db_blocker):
    slow = LocalProvider(seconds_per_word=0.15)  # seconds for the answer: several claim periods
    with (
        django_db_blocker.unblock(),
        WorkerThread(lambda _c: slow, claim_idle_ms=300),
        WorkerThread(lambda _c: slow, claim_idle_ms=300),
    ):
        response = Client().post(
            f"/api/v1/conversations/{live['conversation'].pk}/messages/",
            {"content": "How are refunds paid?", "stream": True},
            content_type="application/json",
            **bearer(live["raw"]),
        )
        events = _events(response)
        messages_flush()
        with tenant_context(live["tenant"]):
            answers = list(Message.objects.filter(conversation=live["conversation"], role="assistant"))

    types = [event_type for event_type, _data in events]
    assert types[-1] == "done"
    assert "error" not in types
    assert types.count("generation.started") == 1  # one worker ran it, once
    assert len(answers) == 1
    assert answers[0].finish_reason == "stop"


def test_a_dead_workers_half_streamed_answer_is_ended_and_stored(live, django_db_blocker):
    schema = live["tenant"].schema_name
    generation_id = str(uuid.uuid4())
    job = TurnJob(
        schema_name=schema,
        generation_id=generation_id,
        conversation_id=str(live["conversation"].pk),
        user_message_id=str(uuid.uuid4()),
        user_content="How are refunds paid?",
        user_message_ts=1,
    )
    redis = get_redis()
    with contextlib.suppress(ResponseError):  # the group exists already
        redis.xgroup_create(JOBS_STREAM, JOBS_GROUP, id="0", mkstream=True)
    redis.xadd(JOBS_STREAM, {"job": json.dumps(job.to_wire())})
    redis.xreadgroup(JOBS_GROUP, "a-worker-that-died", {JOBS_STREAM: ">"}, count=10)
    stream = generation_stream_key(schema, generation_id)
    redis.xadd(stream, {"type": "token", "data": json.dumps({"text": "Refunds are paid "})})

    with django_db_blocker.unblock(), WorkerThread(lambda _c: LocalProvider(seconds_per_word=0), claim_idle_ms=100):
        types: list[bytes] = []
        after = "0-0"
        deadline = time.monotonic() + 10
        while b"error" not in types and time.monotonic() < deadline:
            for _key, entries in redis.xread({stream: after}, block=200) or []:
                for entry_id, fields in entries:
                    after = entry_id
                    types.append(fields[b"type"])
        messages_flush()
        with tenant_context(live["tenant"]):
            stored = list(Message.objects.filter(generation_id=generation_id).values_list("content", "finish_reason"))

    error = json.loads(redis.xrange(stream)[-1][1][b"data"])
    assert types == [b"token", b"error"]
    assert error["code"] == "generation_interrupted"
    assert stored == [("Refunds are paid ", "error")]


async def test_a_generation_worker_rides_out_a_redis_outage(monkeypatch):
    """Before: an unhandled ConnectionError in GenerationWorker.run ended the process within a
    second of a Redis restart. Now it backs off, counts it, and carries on by itself."""
    import asyncio

    import redis.exceptions

    from chat.generation import GenerationWorker
    from chat.metrics import GENERATION_STORE_ERRORS
    from tenants.redis import get_async_redis

    worker = GenerationWorker(redis=get_async_redis(), claim_idle_ms=1_000, route_for=lambda route: LocalProvider())
    real = worker.redis.xreadgroup
    calls = []

    async def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 3:
            raise redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return await real(*args, **kwargs)

    monkeypatch.setattr(worker.redis, "xreadgroup", flaky)
    errors_before = GENERATION_STORE_ERRORS._value.get()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(2)
    is_alive = not running.done()
    stop.set()
    await asyncio.wait_for(running, timeout=10)

    assert is_alive
    assert GENERATION_STORE_ERRORS._value.get() - errors_before == 3
    assert len(calls) > 3  # it read jobs again once Redis answered
