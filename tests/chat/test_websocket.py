"""The WebSocket transport: same events as SSE, cancel and resume from the client, origin checks."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator
from django_tenants.utils import tenant_context

from chat.models import Bot
from chat.providers.local import LocalProvider
from chat.widget import visitor_token_issue
from config.asgi import application

ORIGIN = "https://shop.example.com"


@pytest.fixture
def widget_bot(live, django_db_blocker):
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=[ORIGIN])
        bot = Bot.objects.get(pk=live["bot"].pk)
        token = _visitor_token(live["tenant"], bot)
    return {**live, "bot": bot, "token": token}


def _visitor_token(tenant, bot, *, origin: str = ORIGIN, visitor_id: str = "visitor-1234567890abcdef") -> str:
    """The widget's signed visitor token, as ``POST …/widget/bots/<id>/session/`` issues it."""
    return visitor_token_issue(schema_name=tenant.schema_name, bot=bot, origin=origin, visitor_id=visitor_id).token


def _communicator(
    public_id: str,
    *,
    origin: str | None = ORIGIN,
    query: str = "",
    authorization: str | None = None,
    token: str | None = None,
) -> WebsocketCommunicator:
    if token is not None:
        query = f"token={token}"
    headers = [(b"host", b"localhost")]
    if origin:
        headers.append((b"origin", origin.encode()))
    if authorization:
        headers.append((b"authorization", authorization.encode()))
    return WebsocketCommunicator(application, f"/ws/bots/{public_id}/?{query}", headers=headers)


async def _until_terminal(communicator) -> list[dict]:
    frames = []
    while True:
        frame = await communicator.receive_json_from(timeout=10)
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


async def test_visitor_chats_over_websocket(worker, widget_bot):
    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    connected, _ = await communicator.connect(timeout=10)
    assert connected

    await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
    frames = await _until_terminal(communicator)

    types = [frame["type"] for frame in frames]
    assert types[0] == "message.created"
    assert "token" in types
    assert types[-1] == "done"
    text = "".join(frame["data"]["text"] for frame in frames if frame["type"] == "token")
    assert "original card" in text
    await communicator.disconnect()


async def test_resume_and_cancel_from_the_client(worker, widget_bot, provider_choice):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.03)
    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    await communicator.connect(timeout=10)
    await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
    created = await communicator.receive_json_from(timeout=10)
    first_token = await communicator.receive_json_from(timeout=10)
    await communicator.disconnect()

    again = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    await again.connect(timeout=10)
    generation_id = created["data"]["generation_id"]
    await again.send_json_to({"type": "resume", "generation_id": generation_id, "last_event_id": first_token["id"]})
    resumed = await again.receive_json_from(timeout=10)
    await again.send_json_to({"type": "cancel", "generation_id": generation_id})
    frames = [resumed, *await _until_terminal(again)]

    assert resumed["type"] == "token"
    assert resumed["id"] > first_token["id"] or len(resumed["id"]) > len(first_token["id"])
    assert frames[-1]["type"] == "done"
    assert frames[-1]["data"]["finish_reason"] == "cancelled"
    await again.disconnect()


@pytest.mark.parametrize(
    ("origin", "query"),
    [
        ("https://evil.example.com", "TOKEN"),
        (None, "TOKEN"),
        (ORIGIN, "visitor_id=visitor-1234567890abcdef"),  # a bare visitor id is no longer enough
        (ORIGIN, "token=pwt.forged"),
        (ORIGIN, "OTHER_ORIGIN_TOKEN"),
    ],
    ids=["foreign_origin_case", "no_origin_case", "no_token_case", "forged_token_case", "other_origins_token_case"],
)
async def test_refused_connections_case(widget_bot, origin, query):
    if query == "TOKEN":
        query = f"token={widget_bot['token']}"
    elif query == "OTHER_ORIGIN_TOKEN":
        other = _visitor_token(widget_bot["tenant"], widget_bot["bot"], origin="https://other.example.com")
        query = f"token={other}"
    communicator = _communicator(widget_bot["bot"].public_id, origin=origin, query=query)

    connected, code = await communicator.connect(timeout=10)

    assert (connected, code) == (False, 4403)


async def test_unknown_bot_refused(widget_bot):
    connected, _code = await _communicator("bot_unknown123").connect(timeout=10)

    assert not connected


async def test_api_key_client_needs_no_origin(worker, widget_bot):
    communicator = _communicator(
        widget_bot["bot"].public_id, origin=None, query="", authorization=f"Bearer {widget_bot['raw']}"
    )
    connected, _ = await communicator.connect(timeout=10)
    assert connected

    await communicator.send_json_to({"type": "message", "content": "How many days to return an item?"})
    frames = await _until_terminal(communicator)

    assert frames[-1]["type"] == "done"
    await communicator.disconnect()


async def test_bad_frames_get_errors_not_disconnects(widget_bot):
    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    await communicator.connect(timeout=10)

    await communicator.send_json_to({"type": "launch"})
    unknown = await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"type": "message", "content": ""})
    empty = await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"type": "resume", "generation_id": "nope"})
    missing = await communicator.receive_json_from(timeout=5)

    assert (unknown["type"], unknown["data"]["code"]) == ("error", "invalid_request")
    assert (empty["type"], empty["data"]["code"]) == ("error", "invalid_request")
    assert (missing["type"], missing["data"]["code"]) == ("error", "not_found")
    await communicator.disconnect()


async def test_a_frame_whose_type_is_not_a_string_gets_an_error_not_a_disconnect(widget_bot):
    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    await communicator.connect(timeout=10)

    await communicator.send_json_to({"type": ["message"], "content": "Hello"})
    refused = await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"type": "resume", "generation_id": "nope"})
    still_open = await communicator.receive_json_from(timeout=5)

    assert (refused["type"], refused["data"]["code"], refused["data"]["param"]) == ("error", "invalid_request", "type")
    assert (still_open["type"], still_open["data"]["code"]) == ("error", "not_found")
    await communicator.disconnect()


# --- the one door: visitors are widget visitors, and every turn re-checks its caller ------------


def _jobs_added() -> int:
    from chat.streams import JOBS_STREAM
    from tenants.redis import get_redis

    redis = get_redis()
    return redis.xinfo_stream(JOBS_STREAM)["entries-added"] if redis.exists(JOBS_STREAM) else 0


async def test_websocket_visitors_share_the_widgets_per_address_message_limit(worker, widget_bot, settings):
    settings.PARLEY_WIDGET_MESSAGES_PER_IP_PER_MINUTE = 1
    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    await communicator.connect(timeout=10)

    await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
    first = await _until_terminal(communicator)
    jobs = _jobs_added()
    await communicator.send_json_to({"type": "message", "content": "And returns?"})
    refused = await communicator.receive_json_from(timeout=10)

    assert first[-1]["type"] == "done"
    assert (refused["type"], refused["data"]["type"]) == ("error", "rate_limit_error")
    assert refused["data"]["retry_after"] > 0
    assert _jobs_added() == jobs  # nothing queued for the refused turn
    await communicator.disconnect()


async def test_an_open_sockets_next_turn_is_refused_once_its_key_is_revoked(worker, widget_bot, django_db_blocker):
    from asgiref.sync import sync_to_async

    from tenants.models import ApiKey
    from tenants.services import api_key_parse_prefix, api_key_revoke

    communicator = _communicator(widget_bot["bot"].public_id, origin=None, authorization=f"Bearer {widget_bot['raw']}")
    assert (await communicator.connect(timeout=10))[0]
    await communicator.send_json_to({"type": "message", "content": "How many days to return an item?"})
    assert (await _until_terminal(communicator))[-1]["type"] == "done"

    def revoke():
        api_key_revoke(api_key=ApiKey.objects.get(prefix=api_key_parse_prefix(widget_bot["raw"])))

    with django_db_blocker.unblock():
        await sync_to_async(revoke)()
    jobs = _jobs_added()
    await communicator.send_json_to({"type": "message", "content": "And refunds?"})
    refused = await communicator.receive_json_from(timeout=10)

    assert (refused["type"], refused["data"]["code"]) == ("error", "api_key_revoked")
    assert _jobs_added() == jobs
    await communicator.disconnect()


async def test_an_open_visitor_sockets_next_turn_is_refused_once_the_tenant_is_suspended(
    worker, widget_bot, django_db_blocker
):
    from asgiref.sync import sync_to_async

    from tenants.services import tenant_activate, tenant_suspend

    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    assert (await communicator.connect(timeout=10))[0]
    with django_db_blocker.unblock():
        await sync_to_async(tenant_suspend)(tenant=widget_bot["tenant"])
        try:
            jobs = _jobs_added()
            await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
            refused = await communicator.receive_json_from(timeout=10)
        finally:
            await sync_to_async(tenant_activate)(tenant=widget_bot["tenant"])

    assert (refused["type"], refused["data"]["code"]) == ("error", "tenant_suspended")
    assert _jobs_added() == jobs
    await communicator.disconnect()


async def test_an_admin_key_reaches_any_end_users_conversation_over_websocket(worker, widget_bot, django_db_blocker):
    """As over REST and the OpenAI API: admin-scope credentials see every end user's conversations."""
    from asgiref.sync import sync_to_async

    from tests.factories import make_api_key

    with django_db_blocker.unblock():
        _admin_key, raw_admin = await sync_to_async(make_api_key)(widget_bot["tenant"], scopes=["admin"])
    communicator = _communicator(widget_bot["bot"].public_id, origin=None, authorization=f"Bearer {raw_admin}")
    assert (await communicator.connect(timeout=10))[0]
    # The live conversation belongs to the chat key's end user, not to the admin key.
    conversation_id = str(widget_bot["conversation"].pk)
    await communicator.send_json_to(
        {"type": "message", "content": "How are refunds paid?", "conversation_id": conversation_id}
    )
    frames = await _until_terminal(communicator)

    assert frames[0]["type"] == "message.created"
    assert frames[0]["data"]["conversation_id"] == conversation_id
    assert frames[-1]["type"] == "done"
    await communicator.disconnect()


async def test_a_socket_continues_the_conversation_it_started_before_and_after_it_is_stored(
    worker, widget_bot, django_db_blocker
):
    """A new conversation's row reaches PostgreSQL with the batch writer: the socket that started it
    continues it at once (its own record of it), and from PostgreSQL once it is stored."""
    from asgiref.sync import sync_to_async

    from chat.memory.persistence import messages_flush
    from chat.models import Message

    communicator = _communicator(widget_bot["bot"].public_id, token=widget_bot["token"])
    assert (await communicator.connect(timeout=10))[0]
    await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
    first = await _until_terminal(communicator)
    conversation_id = first[0]["data"]["conversation_id"]
    await communicator.send_json_to({"type": "message", "content": "And returns?", "conversation_id": conversation_id})
    before_stored = await _until_terminal(communicator)
    with django_db_blocker.unblock():
        await sync_to_async(messages_flush)()
    await communicator.send_json_to({"type": "message", "content": "Thanks!", "conversation_id": conversation_id})
    after_stored = await _until_terminal(communicator)
    await communicator.disconnect()

    def stored_questions():
        messages_flush()
        with tenant_context(widget_bot["tenant"]):
            return list(
                Message.objects.filter(conversation_id=conversation_id, role="user")
                .order_by("created_at")
                .values_list("content", flat=True)
            )

    with django_db_blocker.unblock():
        questions = await sync_to_async(stored_questions)()
    assert [frames[-1]["type"] for frames in (first, before_stored, after_stored)] == ["done"] * 3
    assert before_stored[0]["data"]["conversation_id"] == after_stored[0]["data"]["conversation_id"] == conversation_id
    assert questions == ["How are refunds paid?", "And returns?", "Thanks!"]
