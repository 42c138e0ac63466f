"""One chat turn end to end over REST and SSE: a real generation worker (asyncio, own thread),
real Redis streams, real PostgreSQL. Data is committed (the worker has its own connection) and
removed afterwards."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client
from django_tenants.utils import tenant_context

from chat.memory.persistence import messages_flush
from chat.models import Message
from chat.providers.local import LocalProvider
from tests.chat.turn_fixtures import FailingProvider, sse_events
from tests.factories import bearer, make_api_key


def _post(client, live, content, **extra):
    return client.post(
        f"/api/v1/conversations/{live['conversation'].pk}/messages/",
        {"content": content},
        content_type="application/json",
        **bearer(live["raw"]),
        **extra,
    )


def test_turn_answers_from_knowledge_and_stores_metrics(worker, live):
    response = _post(Client(), live, "How many days do I have to return an item?")

    body = response.json()
    assert response.status_code == 200, body
    answer = body["message"]
    assert "30 days" in answer["content"]
    assert "extractive" in answer["content"].lower()
    assert answer["role"] == "assistant"
    assert answer["provider"] == "local"
    assert answer["finish_reason"] == "stop"
    assert answer["tokens_in"] > 0
    assert answer["tokens_out"] > 0
    assert answer["ttft_ms"] is not None
    assert answer["total_ms"] >= answer["ttft_ms"]
    assert answer["citations"]
    assert answer["citations"][0]["title"] == "Returns policy"
    # Batched persistence: the flusher (a Celery beat task in production) writes the turn's rows.
    assert messages_flush() == 2
    with tenant_context(live["tenant"]):
        stored = list(Message.objects.filter(conversation=live["conversation"]).values_list("role", "content"))
    assert stored == [("user", "How many days do I have to return an item?"), ("assistant", answer["content"])]


def test_sse_stream_has_typed_ordered_events(worker, live):
    response = _post(Client(), live, "How are refunds paid?", HTTP_ACCEPT="text/event-stream")

    events = sse_events(response)
    types = [event_type for _id, event_type, _data in events]
    assert response["Content-Type"].startswith("text/event-stream")
    assert types[0] == "message.created"
    assert types[-1] == "done"
    assert "token" in types
    assert "citation" in types
    ids = [event_id for event_id, _type, _data in events]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    text = "".join(data["text"] for _id, event_type, data in events if event_type == "token")
    done = events[-1][2]
    with tenant_context(live["tenant"]):
        messages_flush()
        assert Message.objects.get(pk=done["message_id"]).content == text
    assert done["usage"]["completion_tokens"] > 0


def test_resume_with_last_event_id_continues_exactly(worker, live):
    first = sse_events(_post(Client(), live, "How are refunds paid?", HTTP_ACCEPT="text/event-stream"))
    generation_id = first[0][2]["generation_id"]
    cut = len(first) // 2

    resumed = sse_events(
        Client().get(
            f"/api/v1/generations/{generation_id}/events/", HTTP_LAST_EVENT_ID=first[cut][0], **bearer(live["raw"])
        )
    )

    assert resumed == first[cut + 1 :]


def test_cancel_stops_generation_and_keeps_partial_answer(worker, live, provider_choice):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.05)
    client = Client()
    started = _post(client, live, "How are refunds paid?", HTTP_ACCEPT="text/event-stream")
    generation_id = started["X-Parley-Generation-Id"]

    cancel = client.post(f"/api/v1/generations/{generation_id}/cancel/", **bearer(live["raw"]))
    events = sse_events(started)

    assert cancel.status_code == 202
    assert events[-1][1] == "done"
    assert events[-1][2]["finish_reason"] == "cancelled"
    with tenant_context(live["tenant"]):
        messages_flush()
        saved = Message.objects.get(pk=events[-1][2]["message_id"])
    assert saved.finish_reason == "cancelled"
    assert len(saved.content) < 200


def test_provider_failure_is_a_clear_error(worker, live, provider_choice):
    provider_choice["provider"] = FailingProvider()

    response = _post(Client(), live, "anything")
    streamed = sse_events(_post(Client(), live, "anything", HTTP_ACCEPT="text/event-stream"))

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "provider_unavailable"
    assert streamed[-1][1] == "error"
    assert streamed[-1][2]["code"] == "provider_unavailable"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        ("", 400, "invalid_request"),
        ("   ", 400, "invalid_request"),
        ("x" * 32_001, 400, "message_too_long"),
        ("a\u0000b", 400, "invalid_text"),
    ],
    ids=["empty_case", "blank_case", "huge_case", "nul_case"],
)
def test_bad_message_refused_and_nothing_stored_case(live, django_db_blocker, content, status, code):
    with django_db_blocker.unblock():
        response = _post(Client(), live, content)
        messages_flush()  # anything queued would be written now
        with tenant_context(live["tenant"]):
            count = Message.objects.filter(conversation=live["conversation"]).count()

    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert count == 0


def test_other_end_user_cannot_follow_or_cancel(worker, live, django_db_blocker):
    first = sse_events(_post(Client(), live, "How are refunds paid?", HTTP_ACCEPT="text/event-stream"))
    generation_id = first[0][2]["generation_id"]
    with django_db_blocker.unblock():
        other, other_raw = make_api_key(live["tenant"], scopes=["chat"])
    try:
        follow = Client().get(f"/api/v1/generations/{generation_id}/events/", **bearer(other_raw))
        cancel = Client().post(f"/api/v1/generations/{generation_id}/cancel/", **bearer(other_raw))
        unknown = Client().get(f"/api/v1/generations/{uuid.uuid4()}/events/", **bearer(live["raw"]))
    finally:
        with django_db_blocker.unblock():
            other.delete()

    assert (follow.status_code, cancel.status_code, unknown.status_code) == (404, 404, 404)


def _deterministic(live, django_db_blocker, **cache):
    from chat.services import bot_update

    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        bot_update(bot=live["bot"], generation={"temperature": 0.0}, cache=cache)


def _new_conversation(live, django_db_blocker):
    from chat.services import conversation_create

    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        return conversation_create(bot=live["bot"], end_user_kind="api", end_user_id=live["conversation"].end_user_id)


def test_repeated_question_is_served_from_the_exact_cache(worker, live, django_db_blocker, provider_choice):
    _deterministic(live, django_db_blocker)
    first = _post(Client(), live, "How many days do I have to return an item?")
    # The model is gone: only the cache can answer now, and a new conversation has the same history (none).
    provider_choice["provider"] = FailingProvider()
    live_again = {**live, "conversation": _new_conversation(live, django_db_blocker)}
    second = _post(Client(), live_again, "How many days do I have to return an item?")

    assert first["X-Parley-Cache"] == "miss"
    assert second.status_code == 200, second.content
    assert second["X-Parley-Cache"] == "exact"
    answer = second.json()["message"]
    assert answer["content"] == first.json()["message"]["content"]
    assert answer["is_cached"] is True
    assert answer["cache_layer"] == "exact"
    assert answer["citations"] == first.json()["message"]["citations"]


def test_an_exact_hit_is_answered_at_the_edge_without_a_worker(worker, live, django_db_blocker):
    from chat.streams import JOBS_STREAM
    from tenants.redis import get_redis

    _deterministic(live, django_db_blocker)
    first = _post(Client(), live, "How many days do I have to return an item?")
    jobs_added = get_redis().xinfo_stream(JOBS_STREAM)["entries-added"]
    live_again = {**live, "conversation": _new_conversation(live, django_db_blocker)}
    second = _post(Client(), live_again, "How many days do I have to return an item?")

    assert second["X-Parley-Cache"] == "exact"
    assert get_redis().xinfo_stream(JOBS_STREAM)["entries-added"] == jobs_added  # no job was queued
    answer = second.json()["message"]
    assert answer["content"] == first.json()["message"]["content"]
    assert answer["provider"] == "cache:exact"
    with django_db_blocker.unblock():
        messages_flush()
        with tenant_context(live["tenant"]):
            stored = list(
                Message.objects.filter(conversation=live_again["conversation"]).values_list("role", "is_cached")
            )
    assert stored == [("user", False), ("assistant", True)]


def test_streamed_answers_carry_the_cache_layer_header_and_event(worker, live, django_db_blocker, provider_choice):
    _deterministic(live, django_db_blocker)
    first = _post(Client(), live, "How are refunds paid?", HTTP_ACCEPT="text/event-stream")
    first_events = sse_events(first)
    provider_choice["provider"] = FailingProvider()
    live_again = {**live, "conversation": _new_conversation(live, django_db_blocker)}
    second = _post(Client(), live_again, "How are refunds paid?", HTTP_ACCEPT="text/event-stream")
    second_events = sse_events(second)

    assert (first["X-Parley-Cache"], second["X-Parley-Cache"]) == ("miss", "exact")
    started = [data for _id, event_type, data in second_events if event_type == "generation.started"]
    assert started == [{"cache": "exact"}]
    assert [event_type for _id, event_type, _data in first_events][:2] == ["message.created", "generation.started"]
    assert second_events[-1][2]["cache_layer"] == "exact"

    def text(events):
        return "".join(data["text"] for _id, event_type, data in events if event_type == "token")

    assert text(second_events) == text(first_events)


def test_cache_off_or_nondeterministic_bots_never_hit(worker, live, django_db_blocker):
    _deterministic(live, django_db_blocker, enabled=False)
    _post(Client(), live, "How many days do I have to return an item?")
    live_again = {**live, "conversation": _new_conversation(live, django_db_blocker)}
    second = _post(Client(), live_again, "How many days do I have to return an item?")

    assert second["X-Parley-Cache"] == "miss"
    assert second.json()["message"]["is_cached"] is False


def test_a_knowledge_change_invalidates_cached_answers(worker, live, django_db_blocker):
    from tests.factories import ingest_text

    _deterministic(live, django_db_blocker)
    _post(Client(), live, "How many days do I have to return an item?")
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        ingest_text(live["kb"], "Gift cards", "Gift cards never expire.")
    live_again = {**live, "conversation": _new_conversation(live, django_db_blocker)}
    second = _post(Client(), live_again, "How many days do I have to return an item?")

    assert second["X-Parley-Cache"] == "miss"
