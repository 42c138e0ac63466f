"""The WebSocket transport: same events as SSE, cancel and resume from the client, origin checks."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator
from django_tenants.utils import tenant_context

from chat.models import Bot
from chat.providers.local import LocalProvider
from config.asgi import application

ORIGIN = "https://shop.example.com"


@pytest.fixture
def widget_bot(live, django_db_blocker):
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=[ORIGIN])
    return live


def _communicator(
    public_id: str,
    *,
    origin: str | None = ORIGIN,
    query: str = "visitor_id=visitor-123",
    authorization: str | None = None,
) -> WebsocketCommunicator:
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
    communicator = _communicator(widget_bot["bot"].public_id)
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
    communicator = _communicator(widget_bot["bot"].public_id)
    await communicator.connect(timeout=10)
    await communicator.send_json_to({"type": "message", "content": "How are refunds paid?"})
    created = await communicator.receive_json_from(timeout=10)
    first_token = await communicator.receive_json_from(timeout=10)
    await communicator.disconnect()

    again = _communicator(widget_bot["bot"].public_id)
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
        ("https://evil.example.com", "visitor_id=visitor-123"),
        (None, "visitor_id=visitor-123"),
        (ORIGIN, "visitor_id=x"),
    ],
    ids=["foreign_origin_case", "no_origin_case", "bad_visitor_id_case"],
)
async def test_refused_connections_case(widget_bot, origin, query):
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
    communicator = _communicator(widget_bot["bot"].public_id)
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
