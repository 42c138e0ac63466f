"""The input contract (chat.turn_input, tenants.json_input) at the endpoints where it was broken:
each case here was accepted, coerced or answered with a 500 before the one door."""

from __future__ import annotations

import json
import time

import pytest
from django.test import Client
from django_tenants.utils import tenant_context

from chat.memory.persistence import messages_flush
from chat.models import Conversation, Message
from chat.streams import JOBS_STREAM
from chat.turn_input import TITLE_MAX_CHARS, chat_completion_parse, conversation_title, message_input_parse
from tenants.errors import ValidationFailed
from tenants.json_input import MAX_JSON_DEPTH, json_parse
from tenants.redis import get_redis
from tests.factories import PASSWORD, host_of

pytestmark = pytest.mark.slow


def _complete(live, body, **headers):
    headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {live['raw']}")
    return Client().post("/v1/chat/completions", json.dumps(body), content_type="application/json", **headers)


def _body(live, **extra) -> dict:
    return {"model": live["bot"].public_id, "messages": [{"role": "user", "content": "How are refunds paid?"}], **extra}


def _counts(live) -> tuple[int, int, int]:
    messages_flush()
    redis = get_redis()
    with tenant_context(live["tenant"]):
        stored = (Conversation.objects.count(), Message.objects.count())
    return (*stored, redis.xinfo_stream(JOBS_STREAM)["entries-added"] if redis.exists(JOBS_STREAM) else 0)


# --- text PostgreSQL would refuse never gets in ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"user": "ali\x00ce"}, "user"),
        ({"messages": [{"role": "user", "content": "earlier\x00"}, {"role": "user", "content": "now"}]}, None),
        ({"messages": [{"role": "system", "content": "be\x00nice"}, {"role": "user", "content": "now"}]}, None),
        ({"messages": [{"role": "user", "content": "hi", "name": "bo\x00b"}]}, None),
    ],
    ids=["user_case", "earlier_message_case", "system_message_case", "name_case"],
)
def test_a_nul_anywhere_in_an_openai_request_is_refused_and_nothing_is_kept(live, django_db_blocker, extra, param):
    """Before: 200, and the message flusher failed on the batch for every tenant, forever."""
    with django_db_blocker.unblock():
        before = _counts(live)
        response = _complete(live, _body(live, **extra))
        after = _counts(live)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_text"
    if param is not None:
        assert response.json()["error"]["param"] == param
    assert after == before


def test_a_lone_surrogate_with_a_jwt_is_a_quick_400_that_keeps_nothing(live, django_db_blocker, tenant_pair):
    """Before: with a JWT (Django's view) a 500 after ~23 s, the admission charged and an empty
    conversation row left behind; with an API key, 400."""
    with django_db_blocker.unblock():
        tokens = Client().post(
            "/api/v1/auth/token/",
            {"email": tenant_pair.owner_a.email, "password": PASSWORD},
            content_type="application/json",
            HTTP_HOST=host_of(tenant_pair.a),
        )
        access = tokens.json()["access"]
        before = _counts(live)
        started = time.monotonic()
        body = json.dumps(_body(live)).replace("How are", "How \\ud800 are")
        response = Client().post(
            "/v1/chat/completions",
            body,
            content_type="application/json",
            HTTP_HOST=host_of(tenant_pair.a),
            HTTP_AUTHORIZATION=f"Bearer {access}",
        )
        elapsed = time.monotonic() - started
        after = _counts(live)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "invalid_text"
    assert elapsed < 5
    assert after == before


def test_deeply_nested_json_is_a_400_on_drf_endpoints_not_a_500(live, django_db_blocker):
    """Before: ~2 KB of nested arrays gave a 500 RecursionError on any DRF endpoint."""
    nested = "[" * 1_000 + "]" * 1_000
    with django_db_blocker.unblock():
        responses = [
            Client().post(path, nested, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {live['raw']}")
            for path in (
                f"/api/v1/bots/{live['bot'].public_id}/conversations/",
                f"/api/v1/conversations/{live['conversation'].pk}/messages/",
                "/v1/chat/completions",
            )
        ]
        shallow_enough = Client().post(
            f"/api/v1/conversations/{live['conversation'].pk}/messages/",
            "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1),
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {live['raw']}",
        )

    assert [response.status_code for response in responses] == [400, 400, 400]
    assert {response.json()["error"]["code"] for response in responses} == {"json_too_deep"}
    assert shallow_enough.json()["error"]["code"] == "json_too_deep"


# --- strict types: nothing is coerced ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"model": 5}, "model"),
        ({"user": 7}, "user"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": True}, "seed"),
        ({"n": 2}, "n"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_openai_fields_of_the_wrong_type_are_refused_not_coerced(live, django_db_blocker, extra, param):
    with django_db_blocker.unblock():
        before = _counts(live)
        response = _complete(live, _body(live, **extra))
        after = _counts(live)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == param
    assert after == before


def test_rest_content_that_is_not_a_string_is_refused(live, django_db_blocker):
    with django_db_blocker.unblock():
        response = Client().post(
            f"/api/v1/conversations/{live['conversation'].pk}/messages/",
            {"content": 5},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {live['raw']}",
        )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "content"


# --- one title rule -----------------------------------------------------------------------------


def test_a_conversations_title_follows_one_rule_on_every_path(worker, live, django_db_blocker):
    """Before: cut to 80 characters on the REST path and 200 on the OpenAI path."""
    long_question = "Where   is my refund " + "and why " * 40
    with django_db_blocker.unblock():
        with tenant_context(live["tenant"]):
            Conversation.objects.filter(pk=live["conversation"].pk).update(title="")
        rest = Client().post(
            f"/api/v1/conversations/{live['conversation'].pk}/messages/",
            {"content": long_question},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {live['raw']}",
        )
        openai = _complete(live, _body(live, messages=[{"role": "user", "content": long_question}]))
        messages_flush()
        with tenant_context(live["tenant"]):
            titles = set(
                Conversation.objects.filter(bot_id=live["bot"].pk, messages__content=long_question)
                .values_list("title", flat=True)
                .distinct()
            )

    assert (rest.status_code, openai.status_code) == (200, 200)
    assert titles == {conversation_title(long_question)}
    assert len(conversation_title(long_question)) == TITLE_MAX_CHARS


# --- the contract itself ------------------------------------------------------------------------


def test_json_parse_refuses_depth_and_unstorable_text_and_names_the_field():
    with pytest.raises(ValidationFailed) as too_deep:
        json_parse(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(ValidationFailed) as nul:
        json_parse(b'{"messages": [{"content": "a\\u0000b"}]}')
    with pytest.raises(ValidationFailed) as surrogate:
        json_parse(b'{"content": "\\udc00"}')

    assert json_parse(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    assert too_deep.value.code == "json_too_deep"
    assert (nul.value.code, nul.value.param) == ("invalid_text", "messages.0.content")
    assert surrogate.value.code == "invalid_text"


def test_the_contract_keeps_what_clients_send_and_refuses_the_rest():
    parsed = chat_completion_parse(
        {
            "model": "bot_x",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 20,
            "max_tokens": 99,
            "stop": "\n",
            "stream_options": {"include_usage": True},
        }
    )

    assert parsed.messages[-1].content == "hi there"
    assert parsed.overrides == {"max_tokens": 20, "stop": ["\n"]}
    assert parsed.include_usage is True
    assert message_input_parse({"content": "hi"}).is_streamed is False
    with pytest.raises(ValidationFailed):
        message_input_parse({"content": "hi", "stream": True}, allow_stream=False)  # the widget has no such field
