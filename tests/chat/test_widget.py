"""The embeddable widget's server side: origins, visitor tokens, identity verification, limits,
CORS, the visitor's conversations and turns (a real generation worker), feedback, and the size
of static/widget/parley.js. Data is committed (the worker has its own connection) and removed
with the ``live`` bot."""

from __future__ import annotations

import gzip
import json
import time
import uuid
from pathlib import Path
from unittest import mock

import pytest
from django.conf import settings
from django.test import Client
from django_tenants.utils import tenant_context

from chat import widget
from chat.memory.persistence import messages_flush
from chat.models import Bot, Conversation, Message
from chat.providers.local import LocalProvider
from tenants.errors import AuthenticationFailed
from tests.chat.turn_fixtures import sse_events

ORIGIN = "https://shop.example.com"
OTHER_ORIGIN = "https://evil.example.com"
VISITOR = "visitor-123456"
WIDGET_JS = Path(settings.BASE_DIR) / "static" / "widget" / "parley.js"


@pytest.fixture
def bot(live, django_db_blocker):
    """The live bot, allowed on ORIGIN; the database stays open for the test's requests."""
    with django_db_blocker.unblock():
        with tenant_context(live["tenant"]):
            Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=[ORIGIN], greeting="Hi! Ask me.")
            live["bot"].refresh_from_db()
        yield live["bot"]


def _url(bot, path: str = "session/") -> str:
    return f"/api/v1/widget/bots/{bot.public_id}/{path}"


def _session(bot, *, origin: str | None = ORIGIN, visitor_id: str = VISITOR, ip: str = "10.0.0.1", **body):
    extra = {"HTTP_ORIGIN": origin} if origin else {}
    return Client().post(
        _url(bot), {"visitor_id": visitor_id, **body}, content_type="application/json", REMOTE_ADDR=ip, **extra
    )


def _token(bot, **kwargs) -> str:
    response = _session(bot, **kwargs)
    assert response.status_code == 201, response.content
    return response.json()["token"]


def _headers(token: str, origin: str = ORIGIN) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_ORIGIN": origin}


def _get(bot, path: str, token: str, **extra):
    return Client().get(_url(bot, path), **_headers(token), **extra)


def _post(bot, path: str, token: str, body: dict | None = None, **extra):
    return Client().post(_url(bot, path), body or {}, content_type="application/json", **_headers(token), **extra)


def _conversation(bot, token: str) -> str:
    response = _post(bot, "conversations/", token)
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _ask(bot, token: str, conversation_id: str, content: str):
    return _post(bot, f"conversations/{conversation_id}/messages/", token, {"content": content})


def _error(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


# --- domain: origins ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        ("https://Shop.Example.com/", "https://shop.example.com"),
        ("https://shop.example.com:443", "https://shop.example.com"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("null", None),
        ("", None),
        ("ftp://shop.example.com", None),
        ("https://shop.example.com/path", None),
        ("https://user@shop.example.com", None),
        ("https://shop.example.com:99999", None),
    ],
    ids=[
        "case_and_slash_case",
        "default_port_case",
        "ip_port_case",
        "null_case",
        "empty_case",
        "scheme_case",
        "path_case",
        "credentials_case",
        "bad_port_case",
    ],
)
def test_origin_normalise_case(origin, expected):
    assert widget.origin_normalise(origin) == expected


def test_origin_allowed_only_on_the_list_and_empty_list_refuses_everyone():
    listed = Bot(allowed_origins=["https://shop.example.com"])
    empty = Bot(allowed_origins=[])
    any_origin = Bot(allowed_origins=[], allow_any_origin=True)

    assert widget.origin_allowed(listed, "https://SHOP.example.com")
    assert not widget.origin_allowed(listed, "https://shop.example.com.evil.io")
    assert not widget.origin_allowed(listed, None)
    assert not widget.origin_allowed(empty, "https://shop.example.com")
    assert widget.origin_allowed(any_origin, "https://anything.example.org")


# --- domain: tokens and identity ----------------------------------------------------------------


def _bot_row(**fields) -> Bot:
    return Bot(public_id="bot_domain", name="Domain", **fields)


def test_token_round_trip_names_its_visitor():
    bot = _bot_row()
    issued = widget.visitor_token_issue(schema_name="acme", bot=bot, origin=ORIGIN, visitor_id=VISITOR)

    visitor = widget.visitor_token_verify(issued.token, schema_name="acme", bot=bot, origin=ORIGIN)

    assert visitor.end_user == widget.visitor_end_user(VISITOR)
    assert visitor.end_user.id == f"visitor:{VISITOR}"
    assert 14 * 60 < (issued.expires_at.timestamp() - time.time()) <= 15 * 60


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"origin": OTHER_ORIGIN}, "invalid_token"),
        ({"schema_name": "globex"}, "invalid_token"),
        ({"bot": Bot(public_id="bot_other")}, "invalid_token"),
    ],
    ids=["other_origin_case", "other_tenant_case", "other_bot_case"],
)
def test_token_bound_to_tenant_bot_and_origin_case(change, code):
    bot = _bot_row()
    issued = widget.visitor_token_issue(schema_name="acme", bot=bot, origin=ORIGIN, visitor_id=VISITOR)
    where = {"schema_name": "acme", "bot": bot, "origin": ORIGIN, **change}

    with pytest.raises(AuthenticationFailed) as refused:
        widget.visitor_token_verify(issued.token, **where)

    assert refused.value.code == code


def test_forged_and_expired_tokens_refused():
    bot = _bot_row()
    issued = widget.visitor_token_issue(schema_name="acme", bot=bot, origin=ORIGIN, visitor_id=VISITOR)
    payload, timestamp, signature = issued.token.rsplit(":", 2)
    forged = f"{payload}:{timestamp}:{'A' * len(signature)}"
    with mock.patch("django.core.signing.time.time", return_value=time.time() - 16 * 60):
        expired = widget.visitor_token_issue(schema_name="acme", bot=bot, origin=ORIGIN, visitor_id=VISITOR)

    codes = []
    for token in (forged, expired.token, "not-a-token", issued.token[len(widget.TOKEN_PREFIX) :]):
        with pytest.raises(AuthenticationFailed) as refused:
            widget.visitor_token_verify(token, schema_name="acme", bot=bot, origin=ORIGIN)
        codes.append(refused.value.code)

    assert codes == ["invalid_token", "token_expired", "invalid_token", "invalid_token"]


def test_identity_hash_verified_and_rotation_invalidates(bot, live):
    with tenant_context(live["tenant"]):
        secret = widget.bot_identity_secret_rotate(bot=bot)
        good = widget.user_hash_compute(secret=secret, user_id="customer-42")

        assert widget.identity_verify(bot=bot, user_id="customer-42", user_hash=good) == "customer-42"
        assert widget.identity_verify(bot=bot, user_id=None, user_hash=None) is None
        with pytest.raises(AuthenticationFailed):
            widget.identity_verify(bot=bot, user_id="customer-43", user_hash=good)

        widget.bot_identity_secret_rotate(bot=bot)
        stored = Bot.objects.get(pk=bot.pk).identity_secret
        with pytest.raises(AuthenticationFailed):
            widget.identity_verify(bot=bot, user_id="customer-42", user_hash=good)

    assert stored not in ("", secret)
    assert len(stored) >= 40


def test_theme_keeps_only_safe_values():
    bot = _bot_row(theme={"primary_color": "red;background:url(x)", "text_color": "#fff", "position": "top"})

    assert widget.widget_theme(bot) == {"primary_color": "#3457d5", "text_color": "#fff", "position": "right"}


# --- the token exchange, origins and CORS -------------------------------------------------------


def test_session_issues_a_token_with_the_widget_settings(bot):
    response = _session(bot)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["token"].startswith("pwt.")
    assert body["visitor_id"] == VISITOR
    assert body["is_verified"] is False
    assert body["bot"] == {
        "id": bot.public_id,
        "name": "Support",
        "greeting": "Hi! Ask me.",
        "theme": {"primary_color": "#3457d5", "text_color": "#ffffff", "position": "right"},
    }
    assert response["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in response["Vary"]
    assert "Retry-After" in response["Access-Control-Expose-Headers"]
    assert "X-Parley-Generation-Id" in response["Access-Control-Expose-Headers"]


def test_session_accepts_json_sent_as_plain_text(bot):
    """The widget sends it so, a CORS simple request: no preflight before the first call."""
    response = Client().post(
        _url(bot), json.dumps({"visitor_id": VISITOR}), content_type="text/plain;charset=UTF-8", HTTP_ORIGIN=ORIGIN
    )

    assert response.status_code == 201, response.content


@pytest.mark.parametrize(
    "origin",
    [OTHER_ORIGIN, None, "null", "https://shop.example.com.evil.io"],
    ids=["foreign_case", "absent_case", "null_case", "suffix_case"],
)
def test_disallowed_origin_gets_a_clear_403_case(bot, origin):
    response = _session(bot, origin=origin)

    assert _error(response) == (403, "origin_not_allowed")
    assert "not allowed to use this chat bot" in response.json()["error"]["message"]
    if origin == OTHER_ORIGIN:  # the refused page can read why
        assert response["Access-Control-Allow-Origin"] == OTHER_ORIGIN


def test_empty_list_refuses_everyone_unless_any_origin_is_allowed(bot, live):
    with tenant_context(live["tenant"]):
        Bot.objects.filter(pk=bot.pk).update(allowed_origins=[])
    refused = _session(bot)
    with tenant_context(live["tenant"]):
        Bot.objects.filter(pk=bot.pk).update(allow_any_origin=True)
    allowed = _session(bot, origin="https://anywhere.example.org")

    assert _error(refused) == (403, "origin_not_allowed")
    assert allowed.status_code == 201
    assert allowed["Access-Control-Allow-Origin"] == "https://anywhere.example.org"


def test_preflight_granted_to_allowed_origins_only(bot):
    path = _url(bot, f"conversations/{uuid.uuid4()}/messages/")
    preflight = {"HTTP_ACCESS_CONTROL_REQUEST_METHOD": "POST", "HTTP_ACCESS_CONTROL_REQUEST_HEADERS": "authorization"}

    allowed = Client().options(path, HTTP_ORIGIN=ORIGIN, **preflight)
    refused = Client().options(path, HTTP_ORIGIN=OTHER_ORIGIN, **preflight)

    assert allowed.status_code == 204
    assert allowed["Access-Control-Allow-Origin"] == ORIGIN
    assert allowed["Access-Control-Allow-Methods"] == "GET, POST, OPTIONS"
    assert allowed["Access-Control-Allow-Headers"] == "Authorization, Content-Type, Last-Event-ID"
    assert allowed["Access-Control-Max-Age"] == "3600"
    assert "Origin" in allowed["Vary"]
    assert "Access-Control-Allow-Credentials" not in allowed
    assert _error(refused) == (403, "origin_not_allowed")
    assert "Access-Control-Allow-Origin" not in refused


def test_unknown_bot_is_404_in_the_error_format(bot):
    response = Client().post(
        "/api/v1/widget/bots/bot_unknown1234/session/",
        {"visitor_id": VISITOR},
        content_type="application/json",
        HTTP_ORIGIN=ORIGIN,
    )

    assert _error(response) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"visitor_id": "short"}, "visitor_id"),
        ({"visitor_id": "has spaces in it"}, "visitor_id"),
        ({}, "visitor_id"),
        ({"visitor_id": VISITOR, "extra": 1}, "extra"),
        ({"visitor_id": VISITOR, "user_id": "customer-42"}, "user_hash"),
    ],
    ids=["short_case", "spaces_case", "missing_case", "unknown_field_case", "hash_missing_case"],
)
def test_bad_session_input_is_400_case(bot, body, param):
    response = Client().post(_url(bot), body, content_type="application/json", HTTP_ORIGIN=ORIGIN)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


# --- identity verification ----------------------------------------------------------------------


def test_verified_user_history_follows_them_across_devices(bot, live):
    with tenant_context(live["tenant"]):
        secret = widget.bot_identity_secret_rotate(bot=bot)
    user_hash = widget.user_hash_compute(secret=secret, user_id="customer-42")
    laptop = _session(bot, visitor_id="laptop-visitor", user_id="customer-42", user_hash=user_hash)
    conversation_id = _conversation(bot, laptop.json()["token"])
    phone = _token(bot, visitor_id="phone-visitor", user_id="customer-42", user_hash=user_hash)
    anonymous = _token(bot, visitor_id="phone-visitor")

    on_phone = _get(bot, "conversations/", phone).json()["data"]
    anonymously = _get(bot, "conversations/", anonymous).json()["data"]
    with tenant_context(live["tenant"]):
        stored = Conversation.objects.get(pk=conversation_id)

    assert laptop.json()["is_verified"] is True
    assert [item["id"] for item in on_phone] == [conversation_id]
    assert anonymously == []
    assert (stored.end_user_kind, stored.end_user_id) == ("user", "verified:customer-42")


def test_bad_identity_hash_is_refused(bot, live):
    disabled = _session(bot, user_id="customer-42", user_hash="0" * 64)
    with tenant_context(live["tenant"]):
        widget.bot_identity_secret_rotate(bot=bot)
    forged = _session(bot, user_id="customer-42", user_hash="0" * 64)

    assert _error(disabled) == (400, "identity_verification_disabled")
    assert _error(forged) == (401, "invalid_user_hash")


# --- tokens on later calls ----------------------------------------------------------------------


def test_calls_need_a_valid_token_for_this_bot_and_origin(bot, live):
    token = _token(bot)
    with tenant_context(live["tenant"]):
        Bot.objects.filter(pk=bot.pk).update(allowed_origins=[ORIGIN, OTHER_ORIGIN])
    with mock.patch("django.core.signing.time.time", return_value=time.time() - 16 * 60):
        expired = _token(bot)

    missing = Client().get(_url(bot, "conversations/"), HTTP_ORIGIN=ORIGIN)
    forged = _get(bot, "conversations/", token[:-4] + "AAAA")
    stale = _get(bot, "conversations/", expired)
    elsewhere = Client().get(_url(bot, "conversations/"), **_headers(token, OTHER_ORIGIN))
    api_key = _get(bot, "conversations/", live["raw"])
    fine = _get(bot, "conversations/", token)

    assert _error(missing) == (401, "missing_credentials")
    assert _error(forged) == (401, "invalid_token")
    assert _error(stale) == (401, "token_expired")
    assert _error(elsewhere) == (401, "invalid_token")
    assert _error(api_key) == (401, "invalid_token")
    assert fine.status_code == 200
    assert forged["Access-Control-Allow-Origin"] == ORIGIN  # the widget reads the 401 and renews


def test_origin_removed_from_the_list_stops_its_tokens_at_once(bot, live):
    token = _token(bot)
    with tenant_context(live["tenant"]):
        Bot.objects.filter(pk=bot.pk).update(allowed_origins=[OTHER_ORIGIN])

    assert _error(_get(bot, "conversations/", token)) == (403, "origin_not_allowed")


def test_a_token_of_one_bot_is_refused_by_another(bot, live):
    from chat.services import bot_create

    with tenant_context(live["tenant"]):
        other = bot_create(name="Other", allowed_origins=[ORIGIN])
    try:
        response = _get(other, "conversations/", _token(bot))
    finally:
        from chat.services import bot_delete

        with tenant_context(live["tenant"]):
            bot_delete(bot=other)

    assert _error(response) == (401, "invalid_token")


# --- limits -------------------------------------------------------------------------------------


def test_token_exchanges_limited_per_visitor(bot, settings):
    settings.PARLEY_WIDGET_SESSIONS_PER_VISITOR_PER_MINUTE = 2

    statuses = [_session(bot).status_code for _ in range(2)]
    refused = _session(bot)
    other_visitor = _session(bot, visitor_id="another-visitor")

    assert statuses == [201, 201]
    assert _error(refused) == (429, "rate_limit_exceeded")
    assert 1 <= int(refused["Retry-After"]) <= 30
    assert refused["Access-Control-Allow-Origin"] == ORIGIN
    assert "Too many chat sessions" in refused.json()["error"]["message"]
    assert other_visitor.status_code == 201


def test_token_exchanges_limited_per_address(bot, settings):
    settings.PARLEY_WIDGET_SESSIONS_PER_IP_PER_MINUTE = 3

    statuses = [_session(bot, visitor_id=f"visitor-{index:04d}").status_code for index in range(4)]
    elsewhere = _session(bot, visitor_id="visitor-9999", ip="10.0.0.2")

    assert statuses == [201, 201, 201, 429]
    assert elsewhere.status_code == 201


@pytest.mark.parametrize(
    ("hops", "forwarded", "expected"),
    [
        (0, "203.0.113.9", "10.0.0.1"),
        (1, "198.51.100.7, 203.0.113.9", "203.0.113.9"),
        (2, "198.51.100.7, 203.0.113.9", "198.51.100.7"),
        (2, "203.0.113.9", "10.0.0.1"),
    ],
    ids=["no_proxy_case", "one_hop_case", "two_hops_case", "short_header_case"],
)
def test_client_address_behind_trusted_proxies_case(settings, hops, forwarded, expected):
    settings.PARLEY_WIDGET_TRUSTED_PROXY_HOPS = hops

    address = widget.client_address({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": forwarded})

    assert address == expected


def test_messages_limited_per_visitor_and_refused_turns_store_nothing(bot, live):
    with tenant_context(live["tenant"]):
        Bot.objects.filter(pk=bot.pk).update(rate_limits={"end_user_requests_per_minute": 1})
    token = _token(bot)
    conversation_id = _conversation(bot, token)
    first = _ask(bot, token, conversation_id, "Hello?")
    refused = _ask(bot, token, conversation_id, "Hello again?")
    messages_flush()
    with tenant_context(live["tenant"]):
        contents = list(Message.objects.filter(conversation_id=conversation_id).values_list("content", flat=True))

    assert first.status_code == 200
    assert _error(refused) == (429, "rate_limit_exceeded")
    assert int(refused["Retry-After"]) >= 1
    assert contents == ["Hello?"]


# --- conversations, turns, resume, isolation ----------------------------------------------------


def test_visitor_asks_streams_answer_and_sees_history_when_returning(worker, bot):
    token = _token(bot)
    conversation_id = _conversation(bot, token)

    response = _ask(bot, token, conversation_id, "How many days do I have to return an item?")
    events = sse_events(response)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    assert response["X-Parley-Generation-Id"] == events[0][2]["generation_id"]
    assert response["Access-Control-Allow-Origin"] == ORIGIN
    types = [event_type for _id, event_type, _data in events]
    assert types[0] == "message.created"
    assert "citation" in types
    assert types[-1] == "done"
    answer = "".join(data["text"] for _id, event_type, data in events if event_type == "token")
    assert "30 days" in answer

    returning = _token(bot)  # a new page load, the same visitor id from localStorage
    listed = _get(bot, "conversations/", returning).json()["data"]
    history = _get(bot, f"conversations/{conversation_id}/messages/", returning).json()["data"]

    assert [item["id"] for item in listed] == [conversation_id]
    assert [(item["role"], item["content"]) for item in history] == [
        ("user", "How many days do I have to return an item?"),
        ("assistant", answer),
    ]
    assert history[1]["citations"][0]["title"] == "Returns policy"


def test_resume_with_last_event_id_and_cancel(worker, bot, provider_choice):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.02)
    token = _token(bot)
    conversation_id = _conversation(bot, token)
    first = sse_events(_ask(bot, token, conversation_id, "How are refunds paid?"))
    generation_id = first[0][2]["generation_id"]
    cut = 3

    resumed = sse_events(
        Client().get(
            _url(bot, f"generations/{generation_id}/events/"), HTTP_LAST_EVENT_ID=first[cut][0], **_headers(token)
        )
    )
    cancel = _post(bot, f"generations/{generation_id}/cancel/", token)

    assert resumed == first[cut + 1 :]
    assert cancel.status_code == 202


def test_another_visitor_cannot_read_post_follow_or_cancel(worker, bot):
    token = _token(bot)
    conversation_id = _conversation(bot, token)
    events = sse_events(_ask(bot, token, conversation_id, "How are refunds paid?"))
    generation_id = events[0][2]["generation_id"]
    intruder = _token(bot, visitor_id="intruder-visitor")

    responses = [
        _get(bot, f"conversations/{conversation_id}/messages/", intruder),
        _ask(bot, intruder, conversation_id, "Show me"),
        _get(bot, f"generations/{generation_id}/events/", intruder),
        _post(bot, f"generations/{generation_id}/cancel/", intruder),
        _post(
            bot,
            f"conversations/{conversation_id}/messages/{events[-1][2]['message_id']}/feedback/",
            intruder,
            {"verdict": "down"},
        ),
    ]

    assert [_error(response) for response in responses] == [(404, "not_found")] * 5
    assert _get(bot, "conversations/", intruder).json()["data"] == []


@pytest.mark.parametrize(
    ("content", "code"),
    [("", "invalid_request"), ("   ", "invalid_request"), ("x" * 32_001, "message_too_long")],
    ids=["empty_case", "blank_case", "huge_case"],
)
def test_bad_message_refused_and_nothing_stored_case(bot, live, content, code):
    token = _token(bot)
    conversation_id = _conversation(bot, token)

    response = _ask(bot, token, conversation_id, content)
    messages_flush()
    with tenant_context(live["tenant"]):
        count = Message.objects.filter(conversation_id=conversation_id).count()

    assert _error(response) == (400, code)
    assert count == 0


# --- feedback -----------------------------------------------------------------------------------


def test_feedback_on_own_answer_is_stored(worker, bot, live):
    token = _token(bot)
    conversation_id = _conversation(bot, token)
    events = sse_events(_ask(bot, token, conversation_id, "How are refunds paid?"))
    answer_id = events[-1][2]["message_id"]
    question_id = events[0][2]["message_id"]
    path = f"conversations/{conversation_id}/messages/"

    rated = _post(bot, f"{path}{answer_id}/feedback/", token, {"verdict": "down", "comment": "Too short"})
    on_question = _post(bot, f"{path}{question_id}/feedback/", token, {"verdict": "up"})
    bad_verdict = _post(bot, f"{path}{answer_id}/feedback/", token, {"verdict": "meh"})
    with tenant_context(live["tenant"]):
        stored = Message.objects.get(pk=answer_id)
        question = Message.objects.get(pk=question_id)
    history = _get(bot, path, token).json()["data"]

    assert rated.status_code == 200, rated.content
    assert rated.json()["feedback"] == "down"
    assert (stored.feedback, stored.feedback_comment) == ("down", "Too short")
    assert stored.feedback_at is not None
    assert _error(on_question) == (400, "not_an_answer")
    assert question.feedback == ""
    assert bad_verdict.status_code == 400
    assert history[1]["feedback"] == "down"


# --- schema and the script ----------------------------------------------------------------------


@pytest.mark.django_db
def test_widget_endpoints_are_in_the_openapi_schema(client):
    schema = client.get("/api/schema/").content.decode()

    for path in ("session/", "conversations/", "feedback/", "events/", "cancel/"):
        assert "/api/v1/widget/bots/{public_id}/" in schema
        assert path in schema
    assert "widgetToken" in schema


def test_widget_script_is_under_30_kb_gzipped():
    size = len(gzip.compress(WIDGET_JS.read_bytes(), compresslevel=9))

    assert size < 30 * 1024, f"parley.js is {size} bytes gzipped"
