"""The OpenAI chat completions endpoint at the ASGI edge (chat.transports.openai_edge): served
through config.asgi's application as a real server would, with a real generation worker, Redis
and PostgreSQL; its validation checked against the Django view's serializer."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from django.test import override_settings
from django_tenants.utils import tenant_context

from billing.models import ApiKeyBudget
from chat.memory.persistence import messages_flush
from chat.metrics import EDGE_REQUESTS
from chat.models import Conversation, Message
from chat.services import bot_update
from tenants.models import ApiKey
from tests.chat.turn_fixtures import hub_reads
from tests.factories import make_api_key

pytestmark = pytest.mark.slow


def _host(tenant) -> str:
    return tenant.domains.first().domain


async def _post(
    live, body, *, raw: str | None = None, host: str | None = None, headers: dict | None = None, client_ip="127.0.0.1"
):
    from config.asgi import application

    transport = httpx.ASGITransport(app=application, client=(client_ip, 5000))
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host or 'api.localhost'}") as client:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await client.post(
            "/v1/chat/completions",
            content=content,
            headers={
                "Authorization": f"Bearer {raw or live['raw']}",
                "Content-Type": "application/json",
                **(headers or {}),
            },
            timeout=30,
        )


def _request(live, **extra) -> dict:
    return {"model": live["bot"].public_id, "messages": [{"role": "user", "content": "How are refunds paid?"}], **extra}


def _recorded_requests(provider_choice) -> list:
    """The requests the worker's provider gets from now on (it still answers them)."""
    requests = []
    real = provider_choice["provider"]

    class Recording:
        kind = "recording"

        def stream(self, request):
            requests.append(request)
            return real.stream(request)

    provider_choice["provider"] = Recording()
    return requests


def _bot_update(live, **fields) -> None:
    with tenant_context(live["tenant"]):
        bot_update(bot=type(live["bot"]).objects.get(pk=live["bot"].pk), **fields)


async def test_edge_answers_and_stores_the_conversation_through_the_batch_writer(worker, live, django_db_blocker):
    served_here = EDGE_REQUESTS.labels("200")._value.get()
    with django_db_blocker.unblock():
        response = await _post(live, _request(live, user="alice"))
        assert EDGE_REQUESTS.labels("200")._value.get() == served_here + 1  # not Django's view

        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert "original card" in body["choices"][0]["message"]["content"]
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert response.headers["x-parley-cache"] == "miss"
        assert int(response.headers["x-ratelimit-remaining-requests"]) >= 0
        generation_id = response.headers["x-parley-generation-id"]

        from asgiref.sync import sync_to_async

        await sync_to_async(messages_flush)()

        def stored():
            with tenant_context(live["tenant"]):
                user_message = Message.objects.select_related("conversation").get(
                    generation_id=generation_id, role="user"
                )
                conversation = user_message.conversation
                return (
                    conversation.end_user_kind,
                    conversation.end_user_id.split(":", 2)[2],
                    conversation.title,
                    list(conversation.messages.order_by("created_at").values_list("role", "content")),
                )

        kind, external_user, title, rows = await sync_to_async(stored)()
    assert (kind, external_user, title) == ("api", "alice", "How are refunds paid?")
    assert [role for role, _content in rows] == ["user", "assistant"]
    assert rows[1][1] == body["choices"][0]["message"]["content"]


async def test_edge_streams_openai_chunks(worker, live, django_db_blocker):
    with django_db_blocker.unblock():
        response = await _post(live, _request(live, stream=True, stream_options={"include_usage": True}))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-parley-cache"] == "miss"
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    assert "original card" in text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] == [
        "stop"
    ]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("carries_events", [True, False], ids=["worker_carries_events_case", "worker_from_before_case"])
async def test_edge_follows_its_turn_whichever_way_the_worker_notifies(
    worker, live, django_db_blocker, monkeypatch, carries_events
):
    """The edge's job says its process takes events inside the inbox's notifications; a worker
    that does so spares the stream's read, and one from before (the key alone) still works."""
    from chat.transports.hub import get_hub
    from chat.turn_job import TurnJob

    named = []
    original = TurnJob.inbox_events

    def inbox_events(job):
        named.append(original.fget(job))
        return carries_events and original.fget(job)

    monkeypatch.setattr(TurnJob, "inbox_events", property(inbox_events))
    hub = get_hub()
    reads = hub_reads(hub, monkeypatch)
    with django_db_blocker.unblock():
        response = await _post(live, _request(live, stream=True))

    assert response.status_code == 200
    chunks = [json.loads(line[6:]) for line in response.text.split("\n\n") if line.startswith("data: {")]
    assert "original card" in "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert response.text.endswith("data: [DONE]\n\n")
    assert named
    assert all(named)
    assert (reads == []) is carries_events


async def test_an_answer_whose_last_write_fails_still_reaches_the_client(worker, live, django_db_blocker, monkeypatch):
    """The worker's end-of-turn write refused for the stream's events (once): the client gets
    the whole answer all the same, not a wait for a terminal event that never comes."""
    from chat.streams import CoalescingPublisher

    original = CoalescingPublisher._queue
    refused = []

    def queue_refused_once(self, pipe, batch, *, is_terminal):
        if is_terminal and not refused:
            refused.append([event_type for event_type, _data in batch])
            pipe.execute_command("XADD", self.key, "MAXLEN", "not-a-number", "*", "type", "token")  # Redis refuses it
            return
        original(self, pipe, batch, is_terminal=is_terminal)

    monkeypatch.setattr(CoalescingPublisher, "_queue", queue_refused_once)
    with django_db_blocker.unblock():
        response = await asyncio.wait_for(_post(live, _request(live)), 15)  # without the rewrite: 600 s

    assert refused
    assert refused[0][-1] == "done"
    assert response.status_code == 200
    assert "original card" in response.json()["choices"][0]["message"]["content"]
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def test_edge_ends_a_stream_cleanly_when_redis_fails_after_it_started(live, django_db_blocker, monkeypatch):
    """Lost Redis mid-answer: the client keeps the 200 and the chunks it had, then an error chunk
    ends the stream (no [DONE], no second response start); the turn's hub registration is dropped."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from chat.streams import STARTED_EVENT, StreamEvent
    from chat.transports import openai_edge
    from chat.transports.hub import get_hub

    async def failing(key, *, block_ms, subscription, after="0-0"):
        yield [StreamEvent("1-0", STARTED_EVENT, {"cache": "miss"}), StreamEvent("1-1", "token", {"text": "Refunds "})]
        raise RedisConnectionError("Connection lost")

    monkeypatch.setattr(openai_edge, "follow_batches", failing)
    served_here = EDGE_REQUESTS.labels("200")._value.get()
    with django_db_blocker.unblock():
        response = await _post(live, _request(live, stream=True))

    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    generation_id = response.headers["x-parley-generation-id"]
    assert response.status_code == 200
    assert response.headers["x-parley-cache"] == "miss"
    assert json.loads(lines[-2])["choices"][0]["delta"] == {"content": "Refunds "}
    assert json.loads(lines[-1])["error"]["code"] == "stream_interrupted"  # the SDKs raise it
    assert "[DONE]" not in lines
    assert EDGE_REQUESTS.labels("200")._value.get() == served_here + 1
    assert not [key for key in get_hub().subscribers if generation_id in key]  # unregistered


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_request", "model"),
        ({"model": "MODEL", "messages": []}, 400, "invalid_request", "messages"),
        (
            {"model": "MODEL", "messages": [{"role": "user", "content": "   "}]},
            400,
            "invalid_request",
            "messages.0.content",
        ),
        (
            {"model": "MODEL", "messages": [{"role": "assistant", "content": "hi"}]},
            400,
            "invalid_request",
            "messages.0.role",
        ),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400, None, None),
        (
            {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "bogus": 1},
            400,
            "invalid_request",
            "bogus",
        ),
        ({"model": "MODEL", "messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "message_too_long", None),
        (
            {"model": "bot_doesnotexist", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model_not_found",
            "model",
        ),
    ],
    ids=[
        "invalid_json_case",
        "no_model_case",
        "no_messages_case",
        "blank_message_case",
        "last_not_user_case",
        "bad_temperature_case",
        "unknown_field_case",
        "huge_message_case",
        "unknown_model_case",
    ],
)
async def test_edge_refuses_bad_input_and_stores_nothing_case(live, django_db_blocker, body, status, code, param):
    if isinstance(body, dict) and body.get("model") == "MODEL":
        body["model"] = live["bot"].public_id
    from asgiref.sync import sync_to_async

    def count() -> int:
        with tenant_context(live["tenant"]):
            return Conversation.objects.count()

    with django_db_blocker.unblock():
        before = await sync_to_async(count)()
        response = await _post(live, body)
        await sync_to_async(messages_flush)()
        after = await sync_to_async(count)()

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    assert after == before


async def test_edge_refuses_a_body_over_the_limit(live, django_db_blocker):
    with django_db_blocker.unblock(), override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1_000):
        response = await _post(live, _request(live, messages=[{"role": "user", "content": "x" * 2_000}]))

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_edge_refuses_wrong_keys_scopes_and_tenants(live, tenant_pair, django_db_blocker):
    from asgiref.sync import sync_to_async

    with django_db_blocker.unblock():
        knowledge_only, raw_knowledge = await sync_to_async(make_api_key)(tenant_pair.a, scopes=["knowledge:read"])
        other_tenant, raw_other = await sync_to_async(make_api_key)(tenant_pair.b, scopes=["chat"])
        host_a = await sync_to_async(_host)(tenant_pair.a)
        try:
            bad_secret = await _post(live, _request(live), raw=live["raw"][:-4] + "abcd")
            no_scope = await _post(live, _request(live), raw=raw_knowledge)
            # B's key on A's host: refused, never used to switch tenants.
            wrong_host = await _post(live, _request(live), raw=raw_other, host=host_a)
            # B's key naming A's bot: B has no such model.
            foreign_bot = await _post(live, _request(live), raw=raw_other)
        finally:
            await sync_to_async(ApiKey.objects.filter(pk__in=[knowledge_only.pk, other_tenant.pk]).delete)()

    assert (bad_secret.status_code, bad_secret.json()["error"]["code"]) == (401, "invalid_api_key")
    assert bad_secret.headers["www-authenticate"].startswith("Bearer")
    assert (no_scope.status_code, no_scope.json()["error"]["code"]) == (403, "insufficient_scope")
    assert wrong_host.status_code == 401
    assert (foreign_bot.status_code, foreign_bot.json()["error"]["code"]) == (404, "model_not_found")


async def test_edge_uses_the_bots_new_settings_on_the_next_request(worker, live, django_db_blocker, provider_choice):
    """Bots are cached per configuration epoch: a change applies from the next request."""
    from asgiref.sync import sync_to_async

    requests = _recorded_requests(provider_choice)

    with django_db_blocker.unblock():
        first = await _post(live, _request(live))
        await sync_to_async(_bot_update)(live, system_prompt="You are the refunds desk.")
        second = await _post(live, _request(live))
    seen = [request.messages[0]["content"] for request in requests]

    assert (first.status_code, second.status_code) == (200, 200)
    assert seen[0].startswith("Answer from the handbook.")
    assert seen[1].startswith("You are the refunds desk.")


async def test_edge_leaves_other_credentials_to_django(live, django_db_blocker):
    """A bearer that is not an API key (a JWT, an OAuth2 token) goes through Django's view."""
    served_here = sum(sample.value for sample in EDGE_REQUESTS.collect()[0].samples if sample.name.endswith("_total"))
    with django_db_blocker.unblock():
        response = await _post(live, _request(live), raw="not-an-api-key")
    served_after = sum(sample.value for sample in EDGE_REQUESTS.collect()[0].samples if sample.name.endswith("_total"))

    assert response.status_code == 401
    assert served_after == served_here


async def test_edge_throttles_guessing_a_keys_secret_from_one_address(live, django_db_blocker):
    """After too many wrong secrets from an address, that address gets 429 for the key — even
    with the right secret — while the key keeps working from elsewhere."""
    wrong = live["raw"][:-4] + ("abcd" if not live["raw"].endswith("abcd") else "wxyz")
    unknown_model = _request(live, model="bot_doesnotexist")
    with django_db_blocker.unblock(), override_settings(PARLEY_AUTH_FAILURE_LIMIT=2):
        guesses = [(await _post(live, unknown_model, raw=wrong, client_ip="10.0.0.9")).status_code for _ in range(2)]
        throttled = await _post(live, unknown_model, client_ip="10.0.0.9")
        elsewhere = await _post(live, unknown_model, client_ip="10.0.0.10")

    assert guesses == [401, 401]
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "too_many_auth_failures"
    assert int(throttled.headers["retry-after"]) >= 1
    assert (elsewhere.status_code, elsewhere.json()["error"]["code"]) == (404, "model_not_found")


async def test_edge_turn_carries_its_history_and_the_worker_applies_the_window(
    worker, live, django_db_blocker, provider_choice
):
    """A new conversation's earlier messages travel with the job (the worker calls the model
    without a Redis round trip); the bot's window still decides what the model sees."""
    from asgiref.sync import sync_to_async

    requests = _recorded_requests(provider_choice)
    history = []
    for index in range(3):
        history += [
            {"role": "user", "content": f"question {index}"},
            {"role": "assistant", "content": f"answer {index}"},
        ]
    with django_db_blocker.unblock():
        await sync_to_async(_bot_update)(live, history_window=1)
        response = await _post(live, _request(live, messages=[*history, {"role": "user", "content": "and now?"}]))
    seen = [request.messages for request in requests]

    assert response.status_code == 200, response.text
    history_seen = [message["content"] for message in seen[0][1:] if message.get("name") != "sources"]
    assert history_seen == ["question 2", "answer 2", "and now?"]


def _key_of(live) -> ApiKey:
    from tenants.services import api_key_parse_prefix

    return ApiKey.objects.get(prefix=api_key_parse_prefix(live["raw"]))


def _full_authentications(monkeypatch) -> list:
    """Every full authentication (the resolution's own round trip) from now on."""
    from tenants import authentication

    calls = []
    real = authentication.tenant_and_key_resolve_async

    async def counted(*args, **kwargs):
        calls.append(args[1])
        return await real(*args, **kwargs)

    monkeypatch.setattr(authentication, "tenant_and_key_resolve_async", counted)
    return calls


async def test_a_key_the_edge_accepted_before_is_confirmed_in_the_admissions_round_trip(
    worker, live, django_db_blocker, monkeypatch
):
    full = _full_authentications(monkeypatch)
    with django_db_blocker.unblock():
        responses = [await _post(live, _request(live, stream=index == 2)) for index in range(4)]

    assert [response.status_code for response in responses] == [200] * 4
    assert "original card" in responses[3].json()["choices"][0]["message"]["content"]
    # The first request filled the resolution cache from PostgreSQL, the second read it (and the
    # key was remembered with what it read); the others were confirmed in one round trip.
    assert len(full) == 2
    remaining = [int(response.headers["x-ratelimit-remaining-requests"]) for response in (responses[0], responses[3])]
    # Each request counted once (600 a minute refill one every 100 ms: a slow machine may see one back).
    assert remaining[0] - remaining[1] in (2, 3)


def _confirmations(monkeypatch) -> list:
    """Every confirmation of a known key by the edge from now on: True when it held."""
    from chat import turn_core

    results = []
    real = turn_core.api_key_confirmed

    async def recorded(*args, **kwargs):
        results.append(await real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(turn_core, "api_key_confirmed", recorded)
    return results


async def test_a_known_key_revoked_or_its_tenant_suspended_is_refused_at_once(
    worker, live, tenant_pair, django_db_blocker, monkeypatch
):
    """What the edge remembers of a key is confirmed on every request: a revocation (or a
    suspension) made elsewhere applies to the next request here."""
    from asgiref.sync import sync_to_async

    from tenants.services import api_key_revoke, tenant_activate, tenant_suspend

    confirmations = _confirmations(monkeypatch)
    with django_db_blocker.unblock():
        before = [(await _post(live, _request(live))).status_code for _ in range(3)]
        await sync_to_async(lambda: tenant_suspend(tenant=tenant_pair.a))()
        try:
            suspended = await _post(live, _request(live))
        finally:
            await sync_to_async(lambda: tenant_activate(tenant=tenant_pair.a))()
        again = [(await _post(live, _request(live))).status_code for _ in range(3)]
        await sync_to_async(lambda: api_key_revoke(api_key=_key_of(live)))()
        revoked = await _post(live, _request(live))

    assert before == again == [200, 200, 200]
    assert suspended.status_code == 403
    assert (revoked.status_code, revoked.json()["error"]["code"]) == (401, "api_key_revoked")
    # Known on the second request (the first filled the resolution cache), confirmed on the
    # third; not confirmed after the suspension; so again after it; not after the revocation.
    assert confirmations == [True, False, True, False]


async def test_a_known_key_is_refused_once_its_address_is_throttled(worker, live, django_db_blocker, monkeypatch):
    wrong = live["raw"][:-4] + ("abcd" if not live["raw"].endswith("abcd") else "wxyz")
    confirmations = _confirmations(monkeypatch)
    with django_db_blocker.unblock(), override_settings(PARLEY_AUTH_FAILURE_LIMIT=2):
        known = [(await _post(live, _request(live), client_ip="10.0.0.7")).status_code for _ in range(2)]
        guesses = [(await _post(live, _request(live), raw=wrong, client_ip="10.0.0.7")).status_code for _ in range(2)]
        throttled = await _post(live, _request(live), client_ip="10.0.0.7")
        elsewhere = await _post(live, _request(live), client_ip="10.0.0.8")

    assert (known, guesses) == ([200, 200], [401, 401])
    assert (throttled.status_code, throttled.json()["error"]["code"]) == (429, "too_many_auth_failures")
    assert elsewhere.status_code == 200
    assert confirmations[0] is False  # the key was known: its confirmation saw the address throttled


async def test_turns_end_whole_after_redis_lost_its_scripts(worker, live, django_db_blocker):
    """The worker's scripts go to Redis by their SHA1; after a restart or SCRIPT FLUSH each one
    Redis lacks runs again by its text, once: the answer reaches the hot store, the budget is
    settled to the real usage, and the stream ends (non-streamed: one write at the end; streamed:
    the first token's write too)."""
    from billing.budgets import budget_used
    from chat.memory import hot_store
    from chat.streams import generation_owner_key
    from tenants.redis import get_loop_redis, get_redis

    schema = live["tenant"].schema_name

    def tenant_used() -> int:
        return budget_used(tenant_schema=schema, level="tenant", identity=schema) or 0

    with django_db_blocker.unblock():
        assert (await _post(live, _request(live))).status_code == 200  # every script loaded
        used_before = tenant_used()
        get_redis().script_flush()
        answered = await asyncio.wait_for(_post(live, _request(live)), 15)
        used_after = tenant_used()
        get_redis().script_flush()
        streamed = await asyncio.wait_for(_post(live, _request(live, stream=True)), 15)

    assert answered.status_code == 200
    answer = answered.json()["choices"][0]["message"]["content"]
    assert "original card" in answer
    assert used_after - used_before == answered.json()["usage"]["total_tokens"]  # settled once, not the estimate
    owner = json.loads(get_redis().get(generation_owner_key(schema, answered.headers["x-parley-generation-id"])))
    records, _epoch = await hot_store.hot_recent_if_complete(
        schema_name=schema, conversation_id=owner["conversation_id"], limit=10, client=get_loop_redis()
    )
    assert [(record["role"], record["content"]) for record in records][-1] == ("assistant", answer)
    assert streamed.status_code == 200
    assert "original card" in streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")


# --- a known key's admission and turn in one round trip (chat.admission.AdmissionGate) ------------


def _turns_started_apart(monkeypatch) -> list:
    """The turns the door queues in a round trip of their own from now on (not in the admission's)."""
    from chat import turn_core

    started = []
    real = turn_core._start

    async def recorded(prepared, *args, **kwargs):
        started.append(prepared.job.generation_id)
        return await real(prepared, *args, **kwargs)

    monkeypatch.setattr(turn_core, "_start", recorded)
    return started


def _stored_turns(live) -> list[tuple[str, list[str]]]:
    """Every conversation of the live bot stored through the batch writer: its generation (the
    user message's) and its messages' roles."""
    messages_flush()
    with tenant_context(live["tenant"]):
        stored = []
        for conversation in Conversation.objects.filter(bot_id=live["bot"].pk).exclude(pk=live["conversation"].pk):
            rows = list(conversation.messages.order_by("created_at").values_list("role", "generation_id"))
            stored.append((next(str(generation) for role, generation in rows if role == "user"), [r for r, _ in rows]))
        return stored


def _gate_keys(live) -> list[bytes]:
    from tenants.redis import get_redis

    return list(get_redis().scan_iter(match=f"t:{live['tenant'].schema_name}:gate:*"))


async def test_a_known_keys_turn_is_queued_in_its_admissions_round_trip(worker, live, django_db_blocker, monkeypatch):
    from asgiref.sync import sync_to_async

    apart = _turns_started_apart(monkeypatch)
    with django_db_blocker.unblock():
        responses = [await _post(live, _request(live, stream=index == 3)) for index in range(4)]
        stored = await sync_to_async(_stored_turns)(live)

    assert [response.status_code for response in responses] == [200] * 4
    assert "original card" in responses[2].json()["choices"][0]["message"]["content"]
    assert "original card" in responses[3].text
    assert responses[3].text.rstrip().endswith("data: [DONE]")
    generations = [response.headers["x-parley-generation-id"] for response in responses]
    # The first two requests authenticated the full way, each turn queued once admitted; the key
    # was known from the third on: admitted and queued in one round trip.
    assert apart == generations[:2]
    assert sorted(stored) == sorted((generation, ["user", "assistant"]) for generation in generations)
    assert _gate_keys(live) == []  # the rate limits' markers are gone, no gate was poisoned


async def test_a_known_key_refused_by_a_rate_limit_queues_nothing(worker, live, django_db_blocker, monkeypatch):
    from asgiref.sync import sync_to_async

    from billing.budgets import budget_used

    with django_db_blocker.unblock():
        api_key = await sync_to_async(_key_of)(live)
        await sync_to_async(ApiKeyBudget.objects.create)(
            api_key=api_key, requests_per_minute=3, monthly_token_budget=1_000_000
        )
        apart = _turns_started_apart(monkeypatch)
        responses = [await _post(live, _request(live)) for _ in range(4)]
        stored = await sync_to_async(_stored_turns)(live)

    assert [response.status_code for response in responses] == [200, 200, 200, 429]
    assert responses[3].json()["error"]["type"] == "rate_limit_error"
    generations = [response.headers["x-parley-generation-id"] for response in responses[:3]]
    assert apart == generations[:2]  # the third and the refused fourth went through the gate
    assert sorted(generation for generation, _roles in stored) == sorted(generations)
    # The refused request's budget reservation was given back: the key's budget holds exactly
    # what the three answers used.
    used = budget_used(tenant_schema=live["tenant"].schema_name, level="key", identity=str(api_key.pk))
    assert used == sum(response.json()["usage"]["total_tokens"] for response in responses[:3])


async def test_a_known_key_refused_by_its_budget_queues_nothing(worker, live, django_db_blocker, monkeypatch):
    from asgiref.sync import sync_to_async

    from billing.budgets import budget_counters_key, budget_used, current_month
    from tenants.redis import get_redis

    schema = live["tenant"].schema_name
    with django_db_blocker.unblock():
        api_key = await sync_to_async(_key_of)(live)
        await sync_to_async(ApiKeyBudget.objects.create)(api_key=api_key, monthly_token_budget=1_000_000)
        apart = _turns_started_apart(monkeypatch)
        admitted = [await _post(live, _request(live)) for _ in range(2)]
        # The budget used up elsewhere (another replica's answers): the key is still known here.
        get_redis().hincrby(budget_counters_key(schema, current_month()), f"key:{api_key.pk}", 1_000_000)
        used = budget_used(tenant_schema=schema, level="key", identity=str(api_key.pk))
        refused = await _post(live, _request(live))
        stored = await sync_to_async(_stored_turns)(live)

    assert [response.status_code for response in admitted] == [200, 200]
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "budget_exceeded")
    assert len(apart) == 2  # the refused request went through the gate, and no further
    assert sorted(generation for generation, _roles in stored) == sorted(
        response.headers["x-parley-generation-id"] for response in admitted
    )
    assert budget_used(tenant_schema=schema, level="key", identity=str(api_key.pk)) == used  # nothing reserved


async def test_a_known_keys_gate_that_fails_for_lost_scripts_still_queues_the_turn_once(
    worker, live, django_db_blocker, monkeypatch
):
    """After SCRIPT FLUSH the admission's scripts fail by SHA1: the gate finds no marker and aborts
    the transaction; the admission runs again by the scripts' text, and the turn is queued apart,
    once."""
    from asgiref.sync import sync_to_async

    from tenants.redis import get_redis

    with django_db_blocker.unblock():
        first = [await _post(live, _request(live)) for _ in range(2)]  # the key is known now
        apart = _turns_started_apart(monkeypatch)
        get_redis().script_flush()
        response = await asyncio.wait_for(_post(live, _request(live)), 15)
        stored = await sync_to_async(_stored_turns)(live)

    assert [item.status_code for item in first] == [200, 200]
    assert response.status_code == 200
    assert "original card" in response.json()["choices"][0]["message"]["content"]
    generation = response.headers["x-parley-generation-id"]
    assert apart == [generation]
    assert [roles for stored_generation, roles in stored if stored_generation == generation] == [["user", "assistant"]]
    assert len(stored) == 3


async def test_a_known_keys_exact_cache_hit_is_looked_up_in_the_admissions_round_trip(
    worker, live, django_db_blocker, monkeypatch
):
    """A cacheable request (temperature 0) skips the gate: its exact cache entry is read in the
    admission's round trip, and a hit is answered by the edge — stored, settled, and streamed from
    the events the edge wrote, with no read of the stream."""
    from chat.transports.hub import StreamHub

    reads = []
    real_fetch = StreamHub._fetch

    async def recorded_fetch(self, keys):
        reads.extend(keys)
        return await real_fetch(self, keys)

    monkeypatch.setattr(StreamHub, "_fetch", recorded_fetch)
    apart = _turns_started_apart(monkeypatch)
    with django_db_blocker.unblock():
        responses = [await _post(live, _request(live, temperature=0)) for _ in range(3)]
        streamed = await _post(live, _request(live, temperature=0, stream=True))

    assert [response.headers["x-parley-cache"] for response in responses] == ["miss", "exact", "exact"]
    answers = [response.json()["choices"][0]["message"]["content"] for response in responses]
    assert "original card" in answers[0]
    assert answers[1] == answers[2] == answers[0]
    assert streamed.headers["x-parley-cache"] == "exact"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == answers[0]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    # Every turn is queued in a transaction of its own (a cacheable turn is not gated), and no
    # hit's stream was read back: the edge handed its own events over.
    assert len(apart) == 4
    hits = [responses[1], responses[2], streamed]
    assert not any(response.headers["x-parley-generation-id"] in key for key in reads for response in hits)
