"""Conversation memory across real processes: web processes that share nothing but PostgreSQL and
Redis serve alternate turns of one conversation (and a restarted one continues it), and a flusher
process killed mid-batch loses and duplicates nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from django.conf import settings
from django_tenants.utils import tenant_context

from chat.memory.persistence import WRITE_STREAM, messages_flush, messages_persist
from chat.memory.records import record_of
from chat.models import Message
from chat.providers.local import LocalProvider
from tenants.redis import get_redis
from tests.chat import live as live_servers
from tests.chat.live import BASE_DIR, LiveServer, _die_with_parent

pytestmark = pytest.mark.slow


class RecordingProvider(LocalProvider):
    """The local responder, keeping every prompt it was given."""

    def __init__(self) -> None:
        super().__init__(seconds_per_word=0.0)
        self.prompts: list[list[dict]] = []

    def stream(self, request):
        self.prompts.append([dict(message) for message in request.messages])
        return super().stream(request)


def _say(server: LiveServer, live, content: str) -> dict:
    response = httpx.post(
        f"{server.url}/api/v1/conversations/{live['conversation'].pk}/messages/",
        json={"content": content},
        headers={"Authorization": f"Bearer {live['raw']}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_web_processes_serve_alternate_turns_and_a_restarted_one_continues(
    provider_choice, worker, live, django_db_blocker
):
    recording = RecordingProvider()
    provider_choice["provider"] = recording
    first, second = LiveServer(), LiveServer()
    try:
        answers = [
            _say(first, live, "How many days do I have to return an item?"),
            _say(second, live, "And how are refunds paid?"),
            _say(first, live, "Thanks. Anything about gift cards?"),
        ]
        first.stop()
        restarted = LiveServer()  # a new process in place of the first
        try:
            _say(restarted, live, "One more question.")
            listed = httpx.get(
                f"{restarted.url}/api/v1/conversations/{live['conversation'].pk}/messages/",
                headers={"Authorization": f"Bearer {live['raw']}"},
                timeout=30,
            ).json()["data"]
        finally:
            restarted.stop()
    finally:
        second.stop()
        if first.process.poll() is None:
            first.stop()

    last_prompt = [
        (message["role"], message["content"])
        for message in recording.prompts[-1][1:]
        if message.get("name") != "sources"  # the turn's retrieved sources (chat.engine.build_messages)
    ]
    assert last_prompt == [
        ("user", "How many days do I have to return an item?"),
        ("assistant", answers[0]["message"]["content"]),
        ("user", "And how are refunds paid?"),
        ("assistant", answers[1]["message"]["content"]),
        ("user", "Thanks. Anything about gift cards?"),
        ("assistant", answers[2]["message"]["content"]),
        ("user", "One more question."),
    ]
    # Nothing was flushed: the context and the listing came from the hot store, not PostgreSQL.
    assert len(listed) == 8
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        assert Message.objects.filter(conversation=live["conversation"]).count() == 0
        assert messages_flush() == 8
        assert Message.objects.filter(conversation=live["conversation"]).count() == 8


FLUSHER = (
    "import django; django.setup();"
    "from chat.memory.persistence import messages_flush;"
    "messages_flush(batch_size=50, max_batches=1_000_000)"
)
MESSAGES = 10_000


def test_a_flusher_killed_mid_batch_loses_and_duplicates_nothing(live, django_db_blocker):
    conversation = live["conversation"]
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        records = [
            record_of(Message(conversation=conversation, role="user", content=f"message {index}"))
            for index in range(MESSAGES)
        ]
        for start in range(0, MESSAGES, 1_000):
            assert messages_persist(
                schema_name=live["tenant"].schema_name,
                conversation_id=str(conversation.pk),
                records=records[start : start + 1_000],
            )
    environment = {
        **os.environ,
        "PARLEY_ENV": "test",
        "DATABASE_URL": live_servers.test_database_url(),
        "REDIS_URL": settings.REDIS_URL,
    }
    flusher = subprocess.Popen(
        [sys.executable, "-c", FLUSHER], cwd=BASE_DIR, env=environment, preexec_fn=_die_with_parent
    )

    def stored() -> int:
        with django_db_blocker.unblock(), tenant_context(live["tenant"]):
            return Message.objects.filter(conversation=conversation).count()

    deadline = time.monotonic() + 60
    while stored() < MESSAGES // 4 and time.monotonic() < deadline and flusher.poll() is None:
        time.sleep(0.01)
    flusher.send_signal(signal.SIGKILL)
    flusher.wait(10)
    at_kill = stored()
    left_at_kill = get_redis().xlen(WRITE_STREAM)

    with django_db_blocker.unblock():
        messages_flush(claim_idle_seconds=0, max_batches=1_000)  # the next flusher claims the dead one's batch
        with tenant_context(live["tenant"]):
            contents = list(Message.objects.filter(conversation=conversation).values_list("content", flat=True))

    assert 0 < at_kill < MESSAGES, "the flusher was not killed mid-run"
    assert left_at_kill > 0
    assert len(contents) == MESSAGES
    assert sorted(contents) == sorted(record["content"] for record in records)
    assert get_redis().xlen(WRITE_STREAM) == 0
