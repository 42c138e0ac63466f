"""Conversation memory: the hot-store read a turn makes, against the PostgreSQL path of a miss; and
batched persistence against one INSERT per message, in the same run.

- **hot read**: ``hot_store.hot_recent`` of a 50-turn conversation (100 messages, ~300 bytes each)
  — one pipelined LRANGE + EXISTS and the JSON decoding, as ``load_inputs`` does every turn;
- **miss**: the same read after the conversation's keys were deleted: the newest 100 rows from
  PostgreSQL, merged into Redis by the Lua script, then read back (what a turn pays once after an
  eviction);
- **PostgreSQL only**: the newest 100 rows read as records (a design without the hot store);
- **persistence**: 20,000 messages as 10,000 two-message turns, (a) one INSERT per message, each in
  its own transaction (what a turn did before: autocommit writes), and (b) queued per turn into the
  write stream (one Redis transaction per turn, as ``turn_start`` and the worker do) and written by
  ``messages_flush`` in batches of 1,000: messages per second into PostgreSQL, queue cost per turn.

Targets (issue 7): hot-store read p50 < 5 ms.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_tenants.utils import tenant_context

from chat.memory import hot_store
from chat.memory.persistence import messages_flush, messages_persist
from chat.memory.records import record_of
from chat.models import Conversation, Message
from chat.selectors import message_records_newest
from chat.services import bot_create, bot_delete
from tenants.redis import get_redis
from tests.perf.reporting import Distribution, environment_markdown, markdown_table, report_write, run_environment

READS = 2_000
MISSES = 300
TURNS = 50
PERSISTED_TURNS = 10_000
TARGET_HOT_READ_P50_MS = 5.0
ANSWER = (
    "Refunds are paid to the original card within five working days of the return being received; "
    "store credit is available at once if you prefer it, and gift cards are refunded as gift cards. "
)


@pytest.fixture
def memory_bot(tenant_pair, django_db_blocker):
    with django_db_blocker.unblock(), tenant_context(tenant_pair.a):
        bot = bot_create(name="Memory benchmark")
    yield bot
    with django_db_blocker.unblock(), tenant_context(tenant_pair.a):
        with connection.cursor() as cursor:
            cursor.execute(
                f"DELETE FROM {Message._meta.db_table} WHERE conversation_id IN "
                f"(SELECT id FROM {Conversation._meta.db_table} WHERE bot_id = %s)",
                [bot.pk],
            )
        Conversation.objects.filter(bot=bot).delete()
        bot_delete(bot=bot)


def _turn(conversation: Conversation, index: int, at) -> list[Message]:
    return [
        Message(
            conversation=conversation, role="user", content=f"Question {index}: how are refunds paid?", created_at=at
        ),
        Message(
            conversation=conversation,
            role="assistant",
            content=ANSWER,
            tokens_out=48,
            created_at=at + timedelta(milliseconds=500),
        ),
    ]


def _timed(function, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return samples


def test_memory_hot_store_and_batched_persistence(request, tenant_pair, django_db_blocker, memory_bot):
    schema = tenant_pair.a.schema_name
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
        with tenant_context(tenant_pair.a):
            conversation = Conversation.objects.create(bot=memory_bot, end_user_kind="api", end_user_id="bench")
            start = timezone.now() - timedelta(hours=1)
            messages = [
                message
                for index in range(TURNS)
                for message in _turn(conversation, index, start + timedelta(seconds=index))
            ]
            Message.objects.bulk_create(messages)
            conversation_id = str(conversation.pk)

            def load_newest(count: int) -> list[dict]:
                return message_records_newest(conversation_id=conversation_id, limit=count)

            def hot_read() -> None:
                recent = hot_store.hot_recent(
                    schema_name=schema, conversation_id=conversation_id, limit=100, load_newest=load_newest
                )
                assert len(recent.records) == 100

            def miss_read() -> None:
                hot_store.hot_forget(schema_name=schema, conversation_ids=[conversation_id])
                recent = hot_store.hot_recent(
                    schema_name=schema, conversation_id=conversation_id, limit=100, load_newest=load_newest
                )
                assert recent.from_database
                assert len(recent.records) == 100

            def database_read() -> None:
                assert len(load_newest(100)) == 100

            hot_read()  # fills the store
            for _ in range(50):  # warm-up
                hot_read()
                database_read()
            reads = {
                "hot-store read (50 turns)": _timed(hot_read, READS),
                "miss: PostgreSQL + merge into Redis": _timed(miss_read, MISSES),
                "PostgreSQL only (no hot store)": _timed(database_read, READS),
            }

            # Persistence: one INSERT per message (autocommit) against the write stream + flusher.
            single = Conversation.objects.create(bot=memory_bot, end_user_kind="api", end_user_id="bench-single")
            batched = Conversation.objects.create(bot=memory_bot, end_user_kind="api", end_user_id="bench-batched")
            now = timezone.now()
            started = time.perf_counter()
            for index in range(PERSISTED_TURNS):
                for message in _turn(single, index, now + timedelta(milliseconds=index)):
                    message.save(force_insert=True)
            single_seconds = time.perf_counter() - started

            turns = [_turn(batched, index, now + timedelta(milliseconds=index)) for index in range(PERSISTED_TURNS)]
            started = time.perf_counter()
            for turn in turns:
                messages_persist(
                    schema_name=schema,
                    conversation_id=str(batched.pk),
                    records=[record_of(message) for message in turn],
                )
            queue_seconds = time.perf_counter() - started
            started = time.perf_counter()
            written = 0
            while get_redis().xlen("parley:messages"):
                written += messages_flush(batch_size=1_000, max_batches=10)
            flush_seconds = time.perf_counter() - started
            assert written == 2 * PERSISTED_TURNS
            assert Message.objects.filter(conversation=batched).count() == 2 * PERSISTED_TURNS

    distributions = {name: Distribution.of(samples) for name, samples in reads.items()}
    rows = [
        [name, dist.count, *(f"{value * 1e3:.3f}" for value in (dist.p50, dist.p90, dist.p99, dist.max))]
        for name, dist in distributions.items()
    ]
    total = 2 * PERSISTED_TURNS
    persistence_rows = [
        ["one INSERT per message (autocommit)", f"{total / single_seconds:,.0f}", f"{single_seconds:.2f}", "—"],
        [
            "write stream + batched flush (1,000 a batch)",
            f"{total / flush_seconds:,.0f}",
            f"{flush_seconds:.2f}",
            f"{queue_seconds / PERSISTED_TURNS * 1e3:.3f}",
        ],
    ]
    hot_p50 = distributions["hot-store read (50 turns)"].p50 * 1e3
    markdown = "\n".join(
        [
            environment_markdown(environment),
            "",
            f"- Command: `make bench` (ran as `pytest {request.node.nodeid} -s`); one process, Redis and PostgreSQL "
            "over loopback/socket; a 50-turn conversation (100 messages of ~100-200 characters).",
            "",
            markdown_table(["read", "n", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows),
            "",
            markdown_table(
                [
                    "persistence of 20,000 messages (10,000 turns)",
                    "messages/s into PostgreSQL",
                    "seconds",
                    "queue ms/turn",
                ],
                persistence_rows,
            ),
            "",
            f"Hot-store read p50 {hot_p50:.3f} ms (target < {TARGET_HOT_READ_P50_MS:g} ms: "
            f"{'met' if hot_p50 < TARGET_HOT_READ_P50_MS else 'not met'}); batched writes "
            f"{single_seconds / flush_seconds:.1f}x the rate of one INSERT per message.",
        ]
    )
    report_write(
        name="memory",
        title="Conversation memory: hot store and batched persistence",
        results={
            "reads": {name: dist.as_dict(unit="ms") for name, dist in distributions.items()},
            "single_insert_messages_per_second": total / single_seconds,
            "batched_messages_per_second": total / flush_seconds,
            "queue_ms_per_turn": queue_seconds / PERSISTED_TURNS * 1e3,
        },
        markdown=markdown,
    )
    print(markdown)
