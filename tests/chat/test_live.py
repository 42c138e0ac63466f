"""End to end over real HTTP, under both ASGI servers — uvicorn as production runs it, daphne as
development does: the official openai SDK against Parley, SSE resumed on a second server process
(of the other kind) after a dropped connection, and the WebSocket transport."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from chat.providers.local import LocalProvider
from tests.chat.live import LiveServer

pytestmark = pytest.mark.slow


SERVERS = ("uvicorn", "daphne")


@pytest.fixture(scope="module")
def servers():
    started = {server: LiveServer(server) for server in SERVERS}
    yield started
    for server in started.values():
        server.stop()


@pytest.mark.parametrize("server", SERVERS)
def test_openai_sdk_non_streaming(servers, worker, live, server):
    client = openai.OpenAI(base_url=f"{servers[server].url}/v1", api_key=live["raw"], max_retries=0)

    completion = client.chat.completions.create(
        model=live["bot"].public_id,
        messages=[{"role": "user", "content": "How many days do I have to return an item?"}],
    )

    assert completion.object == "chat.completion"
    assert "30 days" in completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


@pytest.mark.parametrize("server", SERVERS)
def test_openai_sdk_streaming_with_usage(servers, worker, live, server):
    client = openai.OpenAI(base_url=f"{servers[server].url}/v1", api_key=live["raw"], max_retries=0)

    raw = client.chat.completions.with_raw_response.create(
        model=live["bot"].public_id,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are refunds paid?"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(raw.parse())

    assert raw.headers["x-parley-cache"] == "miss"  # the local responder's sampling is not cacheable

    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "original card" in text
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"model": "bot_doesnotexist"}, openai.NotFoundError),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError),
        ({"temperature": 9}, openai.BadRequestError),
        ({"messages": []}, openai.BadRequestError),
    ],
    ids=["unknown_model_case", "last_not_user_case", "bad_temperature_case", "no_messages_case"],
)
def test_openai_sdk_sees_clear_errors_case(servers, live, kwargs, error):
    client = openai.OpenAI(base_url=f"{servers['uvicorn'].url}/v1", api_key=live["raw"], max_retries=0)
    request = {"model": live["bot"].public_id, "messages": [{"role": "user", "content": "hi"}], **kwargs}

    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)

    assert raised.value.body["message"]


def test_openai_sdk_bad_key(servers, live):
    client = openai.OpenAI(base_url=f"{servers['uvicorn'].url}/v1", api_key="prly_nope0000_" + "x" * 40, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def _parse(lines: list[str]) -> list[tuple[str, str, dict]]:
    events, fields = [], {}
    for line in lines:
        if not line:
            if "event" in fields:
                events.append((fields["id"], fields["event"], json.loads(fields["data"])))
            fields = {}
        elif not line.startswith(":") and ": " in line:
            key, value = line.split(": ", 1)
            fields[key] = value
    return events


def _read_events(url: str, headers: dict[str, str]) -> list[tuple[str, str, dict]]:
    with httpx.Client(timeout=30) as client, client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        return _parse([*response.iter_lines(), ""])


def test_sse_resumes_on_second_server_after_dropped_connection(servers, worker, live, provider_choice):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.02)
    first, second = servers["uvicorn"], servers["daphne"]
    headers = {"Authorization": f"Bearer {live['raw']}", "Accept": "text/event-stream"}
    url = f"{first.url}/api/v1/conversations/{live['conversation'].pk}/messages/"

    received_lines: list[str] = []
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url, json={"content": "How are refunds paid?"}, headers=headers) as response,
    ):
        generation_id = response.headers["X-Parley-Generation-Id"]
        for line in response.iter_lines():
            received_lines.append(line)
            if sum(1 for seen in received_lines if seen == "event: token") >= 5 and line == "":
                break  # the connection drops here, mid-answer
    before = _parse(received_lines)

    events_url = f"{second.url}/api/v1/generations/{generation_id}/events/"
    after = _read_events(events_url, {**headers, "Last-Event-ID": before[-1][0]})
    full = _read_events(events_url, headers)

    assert [event[1] for event in before].count("token") == 5
    assert before + after == full
    assert after[-1][1] == "done"
    ids = [event[0] for event in before + after]
    assert len(ids) == len(set(ids))


ORIGIN = "https://shop.example.com"


@pytest.mark.parametrize("server", SERVERS)
def test_websocket_chat_over_the_network(servers, worker, live, django_db_blocker, server):
    """A visitor's page chats over a real WebSocket: the server must speak the protocol (uvicorn
    only does with a WebSocket library installed), and the origin rule holds."""
    from django_tenants.utils import tenant_context
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    from chat.models import Bot
    from chat.widget import visitor_token_issue

    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=[ORIGIN])
        token = visitor_token_issue(
            schema_name=live["tenant"].schema_name,
            bot=Bot.objects.get(pk=live["bot"].pk),
            origin=ORIGIN,
            visitor_id="visitor-1234567890abcdef",
        ).token
    url = f"ws://localhost:{servers[server].port}/ws/bots/{live['bot'].public_id}/?token={token}"

    with connect(url, origin=ORIGIN, open_timeout=10) as websocket:
        websocket.send(json.dumps({"type": "message", "content": "How are refunds paid?"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(websocket.recv(timeout=10)))
    with pytest.raises(InvalidStatus) as refused, connect(url, origin="https://evil.example.com", open_timeout=10):
        pass

    assert frames[0]["type"] == "message.created"
    assert frames[-1]["type"] == "done"
    assert "original card" in "".join(frame["data"]["text"] for frame in frames if frame["type"] == "token")
    assert refused.value.response.status_code == 403
