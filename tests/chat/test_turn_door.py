"""The one door into a turn (chat.turn_core): every transport accepts and refuses the same new
message alike, and a refusal leaves nothing behind — no charge, no row, no job.

Transports: the OpenAI API at the ASGI edge and through Django's view, REST, the widget, and
WebSocket. Each is driven as a client would, over real Redis, PostgreSQL and a generation worker.
"""

from __future__ import annotations

import json

import httpx
import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from django_tenants.utils import tenant_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat.memory.persistence import messages_flush
from chat.models import Bot, Message
from chat.streams import JOBS_STREAM
from chat.widget import visitor_token_issue
from tenants.redis import get_redis

pytestmark = pytest.mark.slow

ORIGIN = "https://shop.example.com"
VISITOR = "door-visitor-0123456789abcdef"


@pytest.fixture
def door(live, django_db_blocker, worker):
    """The live bot on ORIGIN, a visitor token, and a stored conversation per transport that needs one."""
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=[ORIGIN])
        bot = Bot.objects.get(pk=live["bot"].pk)
        token = visitor_token_issue(
            schema_name=live["tenant"].schema_name, bot=bot, origin=ORIGIN, visitor_id=VISITOR
        ).token
    with django_db_blocker.unblock():
        response = Client().post(
            f"/api/v1/widget/bots/{bot.public_id}/conversations/",
            {},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
            HTTP_ORIGIN=ORIGIN,
        )
    assert response.status_code == 201, response.content
    with django_db_blocker.unblock():
        yield {**live, "bot": bot, "token": token, "widget_conversation": response.json()["id"]}


# --- the transports: each sends one new message, and says (status, error code) ------------------


def _error_code(response) -> str | None:
    if response.status_code < 400:
        return None
    return response.json()["error"]["code"]


def _openai_body(door, content) -> dict:
    return {"model": door["bot"].public_id, "messages": [{"role": "user", "content": content}], "stream": True}


def _edge(door, content) -> tuple[int, str | None]:
    from config.asgi import application

    async def post():
        transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 5000))
        async with httpx.AsyncClient(transport=transport, base_url="http://api.localhost") as client:
            return await client.post(
                "/v1/chat/completions",
                content=json.dumps(_openai_body(door, content)).encode(),
                headers={"Authorization": f"Bearer {door['raw']}", "Content-Type": "application/json"},
                timeout=30,
            )

    response = async_to_sync(post)()
    return response.status_code, _error_code(response)


def _openai_view(door, content) -> tuple[int, str | None]:
    """Django's view of the same endpoint (what JWT/OAuth2 callers reach, or all with the edge off)."""
    response = Client().post(
        "/v1/chat/completions",
        json.dumps(_openai_body(door, content)),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {door['raw']}",
    )
    return response.status_code, _error_code(response)


def _rest(door, content) -> tuple[int, str | None]:
    response = Client().post(
        f"/api/v1/conversations/{door['conversation'].pk}/messages/",
        json.dumps({"content": content, "stream": True}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {door['raw']}",
    )
    return response.status_code, _error_code(response)


def _widget(door, content) -> tuple[int, str | None]:
    response = Client().post(
        f"/api/v1/widget/bots/{door['bot'].public_id}/conversations/{door['widget_conversation']}/messages/",
        json.dumps({"content": content}),
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {door['token']}",
        HTTP_ORIGIN=ORIGIN,
    )
    return response.status_code, _error_code(response)


def _websocket(door, content) -> tuple[int, str | None]:
    from config.asgi import application

    async def send():
        communicator = WebsocketCommunicator(
            application,
            f"/ws/bots/{door['bot'].public_id}/?token={door['token']}",
            headers=[(b"host", b"localhost"), (b"origin", ORIGIN.encode())],
        )
        connected, _ = await communicator.connect(timeout=10)
        assert connected
        await communicator.send_to(text_data=json.dumps({"type": "message", "content": content}))
        frame = await communicator.receive_json_from(timeout=10)
        await communicator.disconnect()
        return frame

    frame = async_to_sync(send)()
    if frame["type"] == "error":
        return 400 if frame["data"]["type"] == "invalid_request_error" else 0, frame["data"]["code"]
    assert frame["type"] == "message.created"
    return 200, None


TRANSPORTS = {
    "edge": _edge,
    "openai_view": _openai_view,
    "rest": _rest,
    "widget": _widget,
    "websocket": _websocket,
}


@pytest.fixture(params=sorted(TRANSPORTS), ids=lambda name: f"{name}_case")
def transport(request):
    return TRANSPORTS[request.param]


# --- what a refusal must leave untouched ---------------------------------------------------------


def _traces(door) -> dict:
    """Charges (rate-limit and budget state), stored messages, queued jobs."""
    messages_flush()
    redis = get_redis()
    schema = door["tenant"].schema_name
    charged = {key: redis.dump(key) for key in redis.scan_iter(match=f"t:{schema}:rl:*")}
    charged.update({key: redis.dump(key) for key in redis.scan_iter(match=f"t:{schema}:budget:*")})
    with tenant_context(door["tenant"]):
        stored = Message.objects.count()
    jobs = redis.xinfo_stream(JOBS_STREAM)["entries-added"] if redis.exists(JOBS_STREAM) else 0
    return {"charged": charged, "stored": stored, "jobs": jobs}


BAD_CONTENT = {
    "empty": "",
    "blank": " \n\t ",
    "nul": "refund\x00please",
    "lone_surrogate": "refund \ud800 please",
    "too_long": "x" * 32_001,
    "number": 5,
    "boolean": True,
    "null": None,
    "object": {"text": "hi"},
}


@pytest.mark.parametrize("content", list(BAD_CONTENT.values()), ids=[f"{name}_case" for name in BAD_CONTENT])
def test_a_refused_message_is_charged_stored_and_queued_nowhere(door, transport, content):
    before = _traces(door)

    status, code = transport(door, content)

    assert status == 400
    assert code in ("invalid_request", "invalid_text", "message_too_long")
    assert _traces(door) == before


# --- parity: every transport judges every input alike -------------------------------------------

# Text the way clients send it: ordinary words, and the characters that have caused trouble.
_tricky_text = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
        st.sampled_from(["\x00", "\ud800", "\udfff", " ", "\n", "é", "😀"]),
    ),
    max_size=40,
)
_contents = st.one_of(
    _tricky_text,
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=2),
    st.text(max_size=3).map(lambda text: text + "x" * 32_000),  # over the limit, or just at it
)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same inputs every run: a failure here is reproducible
    database=None,  # nothing written to the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(content=_contents)
def test_every_transport_accepts_and_refuses_the_same_messages_alike(door, content):
    answers = {name: send(door, content) for name, send in TRANSPORTS.items()}

    assert len(set(answers.values())) == 1, answers
