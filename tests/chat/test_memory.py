"""Conversation memory: the hot store, batched persistence, history strategies and retention."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from asgiref.sync import async_to_sync
from django.utils import timezone
from django_tenants.utils import tenant_context

from chat.engine import load_inputs
from chat.memory import history, hot_store, persistence
from chat.memory.persistence import WRITE_STREAM, messages_flush, messages_persist, messages_persist_async
from chat.memory.records import message_of, record_new, record_of, timestamp_of
from chat.memory.summaries import conversation_summarise
from chat.models import Bot, Conversation, Message
from chat.services import bot_create, conversation_create, conversations_purge_expired
from chat.turn_job import TurnJob
from tenants.redis import get_redis, stream_group_ensure

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(tenant_pair):
    with tenant_context(tenant_pair.a):
        bot = bot_create(name="Memory", system_prompt="Be brief.", history_window=2)
        yield conversation_create(bot=bot, end_user_kind="api", end_user_id="key:1")


def _message(conversation, role, content, *, at=None, tokens_out=None) -> Message:
    return Message(
        conversation=conversation,
        role=role,
        content=content,
        created_at=at or timezone.now(),
        tokens_out=tokens_out,
    )


def _turns(conversation, count, *, start=None) -> list[Message]:
    start = start or timezone.now() - timedelta(hours=1)
    messages = []
    for index in range(count):
        at = start + timedelta(seconds=2 * index)
        messages.append(_message(conversation, "user", f"question {index}", at=at))
        messages.append(_message(conversation, "assistant", f"answer {index}.", at=at + timedelta(seconds=1)))
    return messages


def _queue(tenant, conversation, messages, *, is_new=True) -> None:
    with tenant_context(tenant):
        assert messages_persist(
            schema_name=tenant.schema_name,
            conversation_id=str(conversation.pk),
            records=[record_of(message) for message in messages],
            is_new_conversation=is_new,
        )


def _job(tenant, conversation, content="next question") -> TurnJob:
    return TurnJob(
        schema_name=tenant.schema_name,
        generation_id=str(uuid.uuid4()),
        conversation_id=str(conversation.pk),
        user_message_id=str(uuid.uuid4()),
        user_content=content,
        user_message_ts=timestamp_of(timezone.now()),
    )


def _stored(tenant, conversation) -> list[tuple[str, str]]:
    with tenant_context(tenant):
        return list(Message.objects.filter(conversation=conversation).values_list("role", "content"))


# --- hot store ---------------------------------------------------------------------------------


def test_a_new_record_is_the_record_of_the_message_it_stands_for(conversation):
    """The hot paths build records without the model: the record must be what ``record_of`` gives
    for the same new message, defaults included, and survive the round trip to a message."""
    now = timezone.now()
    built = record_new(
        conversation_id=str(conversation.pk),
        role="assistant",
        content="Hello.",
        ts=timestamp_of(now),
        generation_id=str(uuid.uuid4()),
        tokens_out=3,
        citations=[{"title": "Guide"}],
    )
    expected = record_of(message_of(built))
    assert built == expected
    fresh = record_of(Message(conversation=conversation, role="user", content="Hi", created_at=now))
    plain = record_new(conversation_id=str(conversation.pk), role="user", content="Hi", ts=timestamp_of(now))
    assert {**plain, "id": fresh["id"]} == fresh
    assert record_new(conversation_id="c", role="user", content="x", ts=1)["citations"] is not plain["citations"]
    with pytest.raises(TypeError, match="feedbak"):
        record_new(conversation_id="c", role="user", content="x", ts=1, feedbak="up")


def test_turn_history_comes_from_the_hot_store_without_reading_messages(
    tenant_pair, conversation, django_assert_num_queries
):
    _queue(tenant_pair.a, conversation, _turns(conversation, 3))

    # The schema's search path, the conversation with its bot, the bot's knowledge bases: no messages.
    with tenant_context(tenant_pair.a), django_assert_num_queries(3):
        inputs = load_inputs(_job(tenant_pair.a, conversation))

    # The window of 2 turns, nothing from PostgreSQL (nothing was flushed yet).
    assert [item["content"] for item in inputs.history] == ["question 1", "answer 1.", "question 2", "answer 2."]
    assert _stored(tenant_pair.a, conversation) == []


def test_a_hot_store_miss_loads_postgresql_and_keeps_messages_appended_meanwhile(tenant_pair, conversation):
    older = _turns(conversation, 2)
    with tenant_context(tenant_pair.a):
        Message.objects.bulk_create(older)
    # The store lost the conversation (eviction): a new message starts an incomplete list.
    newest = _message(conversation, "user", "still there?")
    _queue(tenant_pair.a, conversation, [newest], is_new=False)

    with tenant_context(tenant_pair.a):
        recent = hot_store.hot_recent(
            schema_name=tenant_pair.a.schema_name,
            conversation_id=str(conversation.pk),
            limit=10,
            load_newest=lambda count: [record_of(message) for message in older][-count:],
        )
        again = hot_store.hot_recent(
            schema_name=tenant_pair.a.schema_name,
            conversation_id=str(conversation.pk),
            limit=10,
            load_newest=lambda count: pytest.fail("a second read must not touch PostgreSQL"),
        )

    expected = ["question 0", "answer 0.", "question 1", "answer 1.", "still there?"]
    assert recent.from_database is True
    assert [record["content"] for record in recent.records] == expected
    assert again.from_database is False
    assert [record["content"] for record in again.records] == expected


def test_the_hot_store_keeps_only_its_capacity(tenant_pair, conversation, settings):
    settings.PARLEY_HOT_STORE_MESSAGES = 6
    _queue(tenant_pair.a, conversation, _turns(conversation, 5))

    recent = hot_store.hot_recent(
        schema_name=tenant_pair.a.schema_name, conversation_id=str(conversation.pk), limit=50, load_newest=list
    )

    assert recent.records[0]["content"] == "question 2"
    assert len(recent.records) == 6


# --- batched persistence -----------------------------------------------------------------------


def test_flush_writes_queued_messages_once_and_touches_the_conversation(tenant_pair, conversation):
    messages = _turns(conversation, 3)
    _queue(tenant_pair.a, conversation, messages)
    # At-least-once delivery: the same messages queued again (a retried turn) change nothing.
    _queue(tenant_pair.a, conversation, messages[:2], is_new=False)

    written = messages_flush()

    assert written == 6
    assert messages_flush() == 0
    assert [content for _role, content in _stored(tenant_pair.a, conversation)][:2] == ["question 0", "answer 0."]
    assert len(_stored(tenant_pair.a, conversation)) == 6
    assert get_redis().xlen(WRITE_STREAM) == 0
    with tenant_context(tenant_pair.a):
        conversation.refresh_from_db()
    assert conversation.last_message_at == messages[-1].created_at


def test_a_dead_flushers_batch_is_claimed_and_written_once(tenant_pair, conversation):
    messages = _turns(conversation, 2)
    _queue(tenant_pair.a, conversation, messages)
    client = get_redis()
    stream_group_ensure(client, WRITE_STREAM, persistence.FLUSH_GROUP)
    # A flusher read the batch, wrote half of it, and died before acknowledging.
    client.xreadgroup(persistence.FLUSH_GROUP, "dead-flusher", {WRITE_STREAM: ">"}, count=100)
    persistence.messages_write(schema_name=tenant_pair.a.schema_name, records=[record_of(m) for m in messages[:2]])

    assert messages_flush(claim_idle_seconds=60) == 0  # still pending on the dead flusher: not yet
    written = messages_flush(claim_idle_seconds=0)

    assert written == 2
    assert len(_stored(tenant_pair.a, conversation)) == 4
    assert client.xpending(WRITE_STREAM, persistence.FLUSH_GROUP)["pending"] == 0


def test_messages_of_a_deleted_conversation_are_dropped_not_retried(tenant_pair, conversation):
    _queue(tenant_pair.a, conversation, _turns(conversation, 1))
    with tenant_context(tenant_pair.a):
        Conversation.objects.filter(pk=conversation.pk).delete()

    assert messages_flush() == 0
    assert get_redis().xlen(WRITE_STREAM) == 0


def _new_conversation_rows(conversation_id: str, contents: list[str]) -> list[Message]:
    now = timezone.now()
    return [
        Message(conversation_id=conversation_id, role="user", content=text, created_at=now + timedelta(microseconds=i))
        for i, text in enumerate(contents)
    ]


def _queue_new_conversation(tenant, bot, conversation_id: str, rows: list[Message]) -> None:
    now = rows[0].created_at
    contents = [row.content for row in rows]
    with get_redis().pipeline(transaction=True) as pipe:
        persistence.queue_on(
            pipe,
            schema_name=tenant.schema_name,
            conversation_id=conversation_id,
            records=[record_of(row) for row in rows],
            is_new_conversation=True,
            conversation=persistence.conversation_record(
                conversation_id=conversation_id,
                bot_id=bot.pk,
                end_user_kind="api",
                end_user_id="key:7:bob",
                title=contents[-1],
                ts=timestamp_of(now),
            ),
        )
        pipe.execute()


def test_a_new_conversations_row_is_written_before_its_messages_and_once(tenant_pair, conversation):
    """The OpenAI edge queues a new conversation's row with its first messages (no SQL on the
    request path); the flusher writes both, the row first, and a redelivery changes nothing."""
    conversation_id = str(uuid.uuid4())
    rows = _new_conversation_rows(conversation_id, ["be brief", "hello?"])
    _queue_new_conversation(tenant_pair.a, conversation.bot, conversation_id, rows)
    _queue_new_conversation(tenant_pair.a, conversation.bot, conversation_id, rows)  # delivered twice

    written = messages_flush()

    with tenant_context(tenant_pair.a):
        stored = Conversation.objects.get(pk=conversation_id)
        assert (stored.bot_id, stored.end_user_id, stored.title) == (conversation.bot_id, "key:7:bob", "hello?")
        assert stored.last_message_at is not None
        assert Message.objects.filter(conversation_id=conversation_id).count() == 2
    assert written == 2


def test_a_new_conversation_of_a_deleted_bot_is_dropped_with_its_messages(tenant_pair, conversation):
    conversation_id = str(uuid.uuid4())
    with tenant_context(tenant_pair.a):
        doomed = bot_create(name="Doomed")
    _queue_new_conversation(tenant_pair.a, doomed, conversation_id, _new_conversation_rows(conversation_id, ["hi"]))
    with tenant_context(tenant_pair.a):
        Bot.objects.filter(pk=doomed.pk).delete()

    assert messages_flush() == 0
    with tenant_context(tenant_pair.a):
        assert not Conversation.objects.filter(pk=conversation_id).exists()
    assert get_redis().xlen(WRITE_STREAM) == 0


def test_with_redis_down_messages_are_written_synchronously(tenant_pair, conversation, monkeypatch, refused_url):
    dead = redis.Redis.from_url(refused_url.replace("http://", "redis://"), socket_connect_timeout=0.2)
    monkeypatch.setattr(persistence, "get_redis", lambda: dead)
    messages = _turns(conversation, 1)

    with tenant_context(tenant_pair.a):
        queued = messages_persist(
            schema_name=tenant_pair.a.schema_name,
            conversation_id=str(conversation.pk),
            records=[record_of(messages[0])],
        )
    asynchronous = async_to_sync(messages_persist_async)(
        schema_name=tenant_pair.a.schema_name,
        conversation_id=str(conversation.pk),
        records=[record_of(messages[1])],
        redis_client=redis.asyncio.Redis.from_url(
            refused_url.replace("http://", "redis://"), socket_connect_timeout=0.2
        ),
    )

    assert (queued, asynchronous) == (False, False)
    assert _stored(tenant_pair.a, conversation) == [("user", "question 0"), ("assistant", "answer 0.")]


# --- history strategies ------------------------------------------------------------------------


def _records(conversation, turns):
    return [record_of(message) for message in _turns(conversation, turns)]


@pytest.mark.parametrize(
    ("strategy", "expected_first", "expected_count"),
    [("full", "question 0", 20), ("window", "question 7", 6)],
    ids=["full_case", "window_case"],
)
def test_strategies_choose_earlier_messages_case(conversation, strategy, expected_first, expected_count):
    chosen = history.build_history(strategy=strategy, records=_records(conversation, 10), window_turns=3, budget=10_000)

    assert chosen.messages[0]["content"] == expected_first
    assert len(chosen.messages) == expected_count
    assert chosen.dropped == 0


def test_history_fits_the_token_budget_dropping_whole_turns_from_the_oldest(conversation):
    records = _records(conversation, 10)
    per_turn = sum(history.message_tokens(record) for record in records[-2:])

    chosen = history.build_history(strategy="full", records=records, window_turns=3, budget=per_turn * 4 + 1)

    assert chosen.messages[0]["content"] == "question 6"
    assert len(chosen.messages) == 8
    assert chosen.tokens <= per_turn * 4 + 1
    assert chosen.dropped == 12


def test_an_answers_real_token_count_is_used_over_the_estimate(conversation):
    answer = record_of(_message(conversation, "assistant", "short", tokens_out=900))

    assert history.message_tokens(answer) == 900 + 4


def test_budget_leaves_room_for_the_prompt_and_the_answer():
    budget = history.history_budget(context_tokens=4_096, max_tokens=1_000, prompt_text="x" * 3_500, user_text="hi")

    assert budget == 4_096 - 1_000 - 1_000 - 1 - 8 - history.SAFETY_MARGIN_TOKENS


def test_summary_strategy_shows_the_summary_then_the_unsummarised_window(conversation):
    records = _records(conversation, 10)

    chosen = history.build_history(
        strategy="summary",
        records=records,
        window_turns=2,
        budget=10_000,
        summary="The user asked about refunds.",
        summary_until_ts=records[9]["ts"],  # turns 0-4 are summarised
    )

    assert chosen.messages[0] == {"role": "system", "content": history.SUMMARY_PREFIX + "The user asked about refunds."}
    assert [item["content"] for item in chosen.messages[1:]] == ["question 8", "answer 8.", "question 9", "answer 9."]
    assert chosen.needs_summary is True  # turns 5-7 are neither summarised nor shown


def test_summarising_folds_old_turns_once(tenant_pair, conversation):
    with tenant_context(tenant_pair.a):
        Bot.objects.filter(pk=conversation.bot_id).update(history_strategy="summary")
        Message.objects.bulk_create(_turns(conversation, 5))

        assert conversation_summarise(conversation_id=str(conversation.pk)) is True
        assert conversation_summarise(conversation_id=str(conversation.pk)) is False
        conversation.refresh_from_db()

    assert "question 0" in conversation.summary
    assert "question 2" in conversation.summary
    assert "question 3" not in conversation.summary  # the window of 2 turns stays verbatim
    with tenant_context(tenant_pair.a):
        inputs = load_inputs(_job(tenant_pair.a, conversation))
    assert inputs.history[0]["role"] == "system"
    assert [item["content"] for item in inputs.history[1:]] == ["question 3", "answer 3.", "question 4", "answer 4."]


# --- retention ---------------------------------------------------------------------------------


def test_retention_purges_idle_conversations_with_their_messages_and_hot_entries(tenant_pair, conversation):
    now = timezone.now()
    with tenant_context(tenant_pair.a):
        recent = conversation_create(bot=conversation.bot, end_user_kind="api", end_user_id="key:2")
        Message.objects.bulk_create(_turns(conversation, 2, start=now - timedelta(days=100)))
        Message.objects.bulk_create(_turns(recent, 1))
        Conversation.objects.filter(pk=conversation.pk).update(last_message_at=now - timedelta(days=100))
        Conversation.objects.filter(pk=recent.pk).update(last_message_at=now - timedelta(days=89))
    _queue(tenant_pair.a, conversation, [], is_new=True)
    get_redis().rpush(hot_store._keys(tenant_pair.a.schema_name, str(conversation.pk))[0], b"{}")

    with tenant_context(tenant_pair.a):
        purged = conversations_purge_expired(retention_days=90, batch_size=1)
        remaining = set(Conversation.objects.values_list("pk", flat=True))
        orphan_messages = Message.objects.filter(conversation_id=conversation.pk).count()

    assert purged == 1
    assert conversation.pk not in remaining
    assert recent.pk in remaining
    assert orphan_messages == 0
    assert get_redis().exists(*hot_store._keys(tenant_pair.a.schema_name, str(conversation.pk))) == 0


# --- a row PostgreSQL refuses never blocks the others --------------------------------------------


def _dead_letters() -> list[dict]:
    return [fields for _id, fields in get_redis().xrange(persistence.DEAD_LETTER_STREAM)]


def test_a_message_postgres_refuses_is_dead_lettered_and_the_good_ones_of_every_tenant_are_written(
    tenant_pair, conversation
):
    """Before: one entry with a NUL byte failed every flush (DataError, never acknowledged) and
    every retry pulled newly queued messages of every tenant into the failing batch."""
    with tenant_context(tenant_pair.b):
        other = conversation_create(bot=bot_create(name="Other"), end_user_kind="api", end_user_id="key:2")
    now = timezone.now()
    good, bad, later = (
        _message(conversation, "user", "before", at=now),
        _message(conversation, "user", "bad\x00row", at=now + timedelta(microseconds=1)),
        _message(conversation, "assistant", "after", at=now + timedelta(microseconds=2)),
    )
    _queue(tenant_pair.a, conversation, [good, bad, later])
    _queue(tenant_pair.b, other, [_message(other, "user", "the other tenant's")])

    written = messages_flush()
    written_again = messages_flush()

    assert written == 3
    assert written_again == 0  # nothing left pending: the flusher is not stuck
    assert [content for _role, content in _stored(tenant_pair.a, conversation)] == ["before", "after"]
    assert [content for _role, content in _stored(tenant_pair.b, other)] == ["the other tenant's"]
    [dead] = _dead_letters()
    assert b"0x00" in dead[b"error"] or b"NUL" in dead[b"error"]
    assert get_redis().xlen(WRITE_STREAM) == 0


def test_a_refused_first_message_still_leaves_its_new_conversation_for_the_next_ones(tenant_pair, conversation):
    conversation_id = str(uuid.uuid4())
    rows = _new_conversation_rows(conversation_id, ["bad\x00first", "fine second"])
    _queue_new_conversation(tenant_pair.a, conversation.bot, conversation_id, rows)

    messages_flush()

    with tenant_context(tenant_pair.a):
        stored = list(Message.objects.filter(conversation_id=conversation_id).values_list("content", flat=True))
        assert Conversation.objects.filter(pk=conversation_id).exists()
    assert stored == ["fine second"]
    assert len(_dead_letters()) == 1
