"""Batched persistence of messages: a turn's finished messages go to a Redis Stream (with the
conversation's hot store, in the same round trip); ``messages_flush`` (a Celery beat task, about
every second) writes them to PostgreSQL in batches.

Delivery is at least once, the effect exactly once: rows are inserted with
``ON CONFLICT (id) DO NOTHING`` (a message's id is made when it is created, before it is queued),
and stream entries are acknowledged and deleted only after the commit. Entries of a flusher that
died mid-batch stay pending in the consumer group and are claimed by the next flusher once idle
for ``PARLEY_MESSAGE_CLAIM_IDLE_SECONDS``; re-inserting what was already written is a no-op.

When Redis is unreachable, ``messages_persist`` writes to PostgreSQL synchronously instead: a
turn is never lost because the stream is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django_tenants.utils import schema_context
from prometheus_client import Counter

from chat.memory import hot_store
from chat.memory import records as message_records
from chat.models import Conversation, Message
from tenants.batches import REFUSED_BY_DATA, write_isolating
from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis, get_redis, stream_batch_read

logger = structlog.get_logger(__name__)

WRITE_STREAM = "parley:messages"
DEAD_LETTER_STREAM = "parley:messages:dead"
MESSAGES_DEAD_LETTERED = Counter(
    "parley_messages_dead_lettered",
    "Messages the batch writer could not store (malformed, or refused by PostgreSQL), moved to "
    "the dead-letter stream with their error.",
)
FLUSH_GROUP = "message-flush"
# 17 columns a row: 3,000 rows stay well under PostgreSQL's 65,535 parameters per statement.
MAX_BATCH_SIZE = 3_000


def default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- queueing (hot path) -----------------------------------------------------------------------


def queue_on(
    pipe,
    *,
    schema_name: str,
    conversation_id: str,
    records: Sequence[dict[str, Any]],
    is_new_conversation: bool = False,
    retention_days: int | None = None,
    conversation: dict[str, Any] | None = None,
    by_sha: bool = False,
) -> None:
    """Queue the messages for the batch writer and append them to the hot store, on ``pipe``
    (sync or asyncio pipeline): the caller executes it with its other writes.

    ``conversation``: a new conversation's row (``conversation_record``), written by the batch
    writer before its messages — it travels in the first message's entry, so it cannot be late.
    ``by_sha``: the hot store's script by its SHA1 (``hot_store.hot_append``)."""
    for index, record in enumerate(records):
        fields = {"s": schema_name, "m": message_records.dumps(record)}
        if index == 0 and conversation is not None:
            fields["c"] = orjson.dumps(conversation)
        pipe.xadd(WRITE_STREAM, fields)
    hot_store.hot_append(
        pipe,
        schema_name=schema_name,
        conversation_id=conversation_id,
        records=records,
        is_new_conversation=is_new_conversation,
        retention_days=retention_days,
        by_sha=by_sha,
    )


def messages_persist(
    *, schema_name: str, conversation_id: str, records: Sequence[dict[str, Any]], is_new_conversation: bool = False
) -> bool:
    """Queue the messages (True), or write them now if Redis is down (False)."""
    try:
        with get_redis().pipeline(transaction=True) as pipe:
            queue_on(
                pipe,
                schema_name=schema_name,
                conversation_id=conversation_id,
                records=records,
                is_new_conversation=is_new_conversation,
            )
            pipe.execute()
    except REDIS_UNAVAILABLE as error:
        logger.warning("message_stream_unavailable", conversation_id=conversation_id, error=str(error))
        messages_write(schema_name=schema_name, records=records)
        return False
    return True


async def messages_persist_async(
    *, schema_name: str, conversation_id: str, records: Sequence[dict[str, Any]], redis_client=None
) -> bool:
    """``messages_persist`` for async code (generation workers): never blocks the loop."""
    client = redis_client or get_loop_redis()
    try:
        async with client.pipeline(transaction=True) as pipe:
            queue_on(pipe, schema_name=schema_name, conversation_id=conversation_id, records=records)
            await pipe.execute()
    except REDIS_UNAVAILABLE as error:
        logger.warning("message_stream_unavailable", conversation_id=conversation_id, error=str(error))
        await sync_to_async(messages_write, thread_sensitive=True)(schema_name=schema_name, records=records)
        return False
    return True


def conversation_record(
    *, conversation_id: str, bot_id: int, end_user_kind: str, end_user_id: str, title: str, ts: int
) -> dict[str, Any]:
    """A conversation's row for the batch writer (``ts``: microseconds since the epoch): a new one
    is inserted; a stored one gets ``title`` if it has none."""
    return {
        "id": conversation_id,
        "bot_id": bot_id,
        "end_user_kind": end_user_kind,
        "end_user_id": end_user_id[:200],
        "title": title[:200],
        "ts": ts,
    }


# --- writing (batch) ---------------------------------------------------------------------------


_CONVERSATIONS_SQL = """
INSERT INTO {conversation} (id, bot_id, end_user_kind, end_user_id, title, created_at, last_message_at,
                            summary, summary_until_ts)
SELECT id, bot_id, kind, user_id, title, at, at, '', 0
FROM unnest(%s::uuid[], %s::bigint[], %s::text[], %s::text[], %s::text[], %s::timestamptz[])
     AS row (id, bot_id, kind, user_id, title, at)
WHERE EXISTS (SELECT 1 FROM {bot} WHERE {bot}.id = row.bot_id)
ON CONFLICT (id) DO UPDATE SET title = EXCLUDED.title WHERE {conversation}.title = ''
"""


def _conversations_insert(cursor, conversations: Sequence[dict[str, Any]]) -> None:
    """New conversations queued with their first messages (their bot may have been deleted since:
    skipped, and their messages with them); for a stored conversation without a title, its title.
    One row per conversation (an upsert may not touch a row twice): the first queued wins."""
    from chat.models import Bot

    conversations = list({item["id"]: item for item in reversed(conversations)}.values())

    cursor.execute(
        _CONVERSATIONS_SQL.format(conversation=Conversation._meta.db_table, bot=Bot._meta.db_table),
        [
            [item["id"] for item in conversations],
            [item["bot_id"] for item in conversations],
            [item["end_user_kind"] for item in conversations],
            [item["end_user_id"] for item in conversations],
            [item["title"] for item in conversations],
            [message_records.EPOCH + item["ts"] * message_records.MICROSECOND for item in conversations],
        ],
    )


def messages_write(
    *, schema_name: str, records: Sequence[dict[str, Any]], conversations: Sequence[dict[str, Any]] = ()
) -> int:
    """Insert the messages into the tenant's schema (skipping ids already stored, and messages of
    conversations deleted meanwhile), after the new ``conversations`` queued with them; returns
    rows inserted. One transaction."""
    unique = list({record["id"]: record for record in records}.values())
    if not unique and not conversations:
        return 0
    with schema_context(schema_name), transaction.atomic():
        if conversations:
            with connection.cursor() as cursor:
                _conversations_insert(cursor, conversations)
        conversation_ids = {record["conversation_id"] for record in unique}
        alive = {str(pk) for pk in Conversation.objects.filter(pk__in=conversation_ids).values_list("pk", flat=True)}
        rows = [record for record in unique if record["conversation_id"] in alive]
        if len(rows) < len(unique):
            logger.info("messages_of_deleted_conversations_dropped", count=len(unique) - len(rows))
        if not rows:
            return 0
        inserted = 0
        with connection.cursor() as cursor:
            for start in range(0, len(rows), MAX_BATCH_SIZE):
                cursor.execute(_insert_sql(), _columns_of(rows[start : start + MAX_BATCH_SIZE]))
                inserted += len(cursor.fetchall())
            latest: dict[str, int] = {}
            for record in rows:
                latest[record["conversation_id"]] = max(latest.get(record["conversation_id"], 0), record["ts"])
            cursor.execute(
                _TOUCH_SQL.format(conversation=Conversation._meta.db_table),
                [list(latest), [message_records.EPOCH + ts * message_records.MICROSECOND for ts in latest.values()]],
            )
    return inserted


# One row per array element: the statement's size does not grow with the batch, and nothing is
# built per row but the column values. Column → (SQL array type, value of a record).
_COLUMN_ARRAYS: tuple[tuple[str, str, Any], ...] = (
    ("id", "uuid[]", lambda record: record["id"]),
    ("conversation_id", "uuid[]", lambda record: record["conversation_id"]),
    (
        "created_at",
        "timestamptz[]",
        lambda record: message_records.EPOCH + record["ts"] * message_records.MICROSECOND,
    ),
    ("role", "text[]", lambda record: record["role"]),
    ("content", "text[]", lambda record: record["content"]),
    ("generation_id", "uuid[]", lambda record: record.get("generation_id")),
    ("tokens_in", "integer[]", lambda record: record.get("tokens_in")),
    ("tokens_out", "integer[]", lambda record: record.get("tokens_out")),
    ("ttft_ms", "float8[]", lambda record: record.get("ttft_ms")),
    ("total_ms", "float8[]", lambda record: record.get("total_ms")),
    ("provider", "text[]", lambda record: record.get("provider") or ""),
    ("model", "text[]", lambda record: record.get("model") or ""),
    ("is_cached", "boolean[]", lambda record: bool(record.get("is_cached"))),
    ("cache_layer", "text[]", lambda record: record.get("cache_layer") or ""),
    ("citations", "text[]::jsonb[]", lambda record: json.dumps(record.get("citations") or [])),
    ("finish_reason", "text[]", lambda record: record.get("finish_reason") or ""),
    ("feedback", "text[]", lambda record: ""),
    ("feedback_comment", "text[]", lambda record: ""),
)

# Conversations' last activity follows their newest message, never moving backwards.
_TOUCH_SQL = """
UPDATE {conversation} AS conversation SET last_message_at = GREATEST(conversation.last_message_at, latest.at)
FROM unnest(%s::uuid[], %s::timestamptz[]) AS latest (id, at)
WHERE conversation.id = latest.id
"""


def _insert_sql() -> str:
    columns = ", ".join(name for name, _type, _value in _COLUMN_ARRAYS)
    arrays = ", ".join(f"%s::{array_type}" for _name, array_type, _value in _COLUMN_ARRAYS)
    return (
        f"INSERT INTO {Message._meta.db_table} ({columns}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (id) DO NOTHING RETURNING 1"
    )


def _columns_of(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[value(record) for record in records] for _name, _type, value in _COLUMN_ARRAYS]


# --- flushing (Celery beat) --------------------------------------------------------------------


def messages_flush(
    *,
    batch_size: int | None = None,
    consumer: str | None = None,
    max_batches: int = 50,
    claim_idle_seconds: float | None = None,
) -> int:
    """Move messages from the stream to PostgreSQL, a batch at a time, until a batch comes back
    short or ``max_batches`` were written; returns rows inserted.

    Safe to run concurrently (each consumer of the group gets different entries) and to crash at
    any point (see the module's docstring).
    """
    batch_size = max(1, min(batch_size or settings.PARLEY_MESSAGE_FLUSH_BATCH, MAX_BATCH_SIZE))
    idle = settings.PARLEY_MESSAGE_CLAIM_IDLE_SECONDS if claim_idle_seconds is None else claim_idle_seconds
    consumer = consumer or default_consumer()
    client = get_redis()
    written = 0
    for _batch in range(max_batches):
        entries, _trimmed = stream_batch_read(
            client, WRITE_STREAM, FLUSH_GROUP, consumer=consumer, batch_size=batch_size, claim_idle_ms=int(idle * 1000)
        )
        if not entries:
            break
        written += _write_entries(client, entries)
        if len(entries) < batch_size:
            break
    return written


@dataclass(frozen=True, slots=True)
class _Entry:
    """One write-stream entry: a message's record, and the conversation's row when it is the first."""

    entry_id: bytes
    fields: dict
    record: dict[str, Any]
    conversation: dict[str, Any] | None


def _write_entries(client: redis.Redis, entries: list[tuple[bytes, dict]]) -> int:
    by_schema: dict[str, list[_Entry]] = defaultdict(list)
    dead: list[tuple[bytes, dict, str]] = []
    for entry_id, fields in entries:
        try:
            conversation = json.loads(fields[b"c"]) if b"c" in fields else None
            record = message_records.loads(fields[b"m"])
            by_schema[fields[b"s"].decode()].append(_Entry(entry_id, fields, record, conversation))
        except (KeyError, ValueError, TypeError) as error:
            logger.error("message_entry_malformed", entry_id=entry_id.decode(), error=str(error))
            dead.append((entry_id, fields, f"malformed: {error}"))
    written = 0
    for schema_name, items in by_schema.items():
        try:
            count, refused = write_isolating(
                items,
                functools.partial(_write_batch, schema_name),
                before_one_by_one=functools.partial(_write_conversations, schema_name),
            )
        except DatabaseError:
            if _schema_exists(schema_name):
                raise  # the database is in trouble: leave the entries pending for the next flush
            logger.warning("messages_of_deleted_tenant_dropped", tenant=schema_name, count=len(items))
            continue
        written += count
        for refusal in refused:
            logger.error(
                "message_refused_by_postgres",
                tenant=schema_name,
                entry_id=refusal.item.entry_id.decode(),
                error=refusal.error,
            )
            dead.append((refusal.item.entry_id, refusal.item.fields, refusal.error))
    ids = [entry_id for entry_id, _fields in entries]
    with client.pipeline(transaction=True) as pipe:
        for entry_id, fields, reason in dead:
            entry = {**fields, b"source_id": entry_id, b"error": reason.encode()}
            pipe.xadd(DEAD_LETTER_STREAM, entry, maxlen=10_000, approximate=True)
        pipe.xack(WRITE_STREAM, FLUSH_GROUP, *ids)
        pipe.xdel(WRITE_STREAM, *ids)  # the stream holds only what is still to write
        pipe.execute()
    if dead:
        MESSAGES_DEAD_LETTERED.inc(len(dead))
    return written


def _write_conversations(schema_name: str, items: Sequence[_Entry]) -> None:
    """New conversations' rows alone, before their messages are written one by one: a refused
    first message (which carries its conversation's row) must not take the later ones with it."""
    for item in items:
        if item.conversation is not None:
            with contextlib.suppress(*REFUSED_BY_DATA):  # a refused row here: its messages follow it out
                messages_write(schema_name=schema_name, records=[], conversations=[item.conversation])


def _write_batch(schema_name: str, items: Sequence[_Entry]) -> int:
    conversations = [item.conversation for item in items if item.conversation is not None]
    return messages_write(schema_name=schema_name, records=[item.record for item in items], conversations=conversations)


def _schema_exists(schema_name: str) -> bool:
    from tenants.models import Tenant

    return Tenant.objects.filter(schema_name=schema_name).exists()


def messages_backlog() -> int:
    """Messages waiting to be written (new and pending): a gauge for the flusher's health."""
    return cast(int, get_redis().xlen(WRITE_STREAM))
