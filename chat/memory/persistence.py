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

import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django_tenants.utils import schema_context

from chat.memory import hot_store
from chat.memory import records as message_records
from chat.models import Conversation, Message
from tenants.redis import get_loop_redis, get_redis

logger = structlog.get_logger(__name__)

WRITE_STREAM = "parley:messages"
DEAD_LETTER_STREAM = "parley:messages:dead"
FLUSH_GROUP = "message-flush"
# 17 columns a row: 3,000 rows stay well under PostgreSQL's 65,535 parameters per statement.
MAX_BATCH_SIZE = 3_000
REDIS_UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


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
) -> None:
    """Queue the messages for the batch writer and append them to the hot store, on ``pipe``
    (sync or asyncio pipeline): the caller executes it with its other writes."""
    for record in records:
        pipe.xadd(WRITE_STREAM, {"s": schema_name, "m": message_records.dumps(record)})
    hot_store.hot_append(
        pipe,
        schema_name=schema_name,
        conversation_id=conversation_id,
        records=records,
        is_new_conversation=is_new_conversation,
        retention_days=retention_days,
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


# --- writing (batch) ---------------------------------------------------------------------------

_COLUMNS = ("id", "conversation_id", "created_at", *message_records.FIELDS, "feedback", "feedback_comment")

# Conversations' last activity follows their newest message, never moving backwards.
_TOUCH_SQL = """
UPDATE {conversation} AS conversation SET last_message_at = GREATEST(conversation.last_message_at, latest.at)
FROM (VALUES {values}) AS latest (id, at)
WHERE conversation.id = latest.id::uuid
"""


def messages_write(*, schema_name: str, records: Sequence[dict[str, Any]]) -> int:
    """Insert the messages into the tenant's schema (skipping ids already stored, and messages of
    conversations deleted meanwhile); returns rows inserted. One transaction."""
    unique = list({record["id"]: record for record in records}.values())
    if not unique:
        return 0
    with schema_context(schema_name), transaction.atomic():
        conversation_ids = {record["conversation_id"] for record in unique}
        alive = {str(pk) for pk in Conversation.objects.filter(pk__in=conversation_ids).values_list("pk", flat=True)}
        rows = [message_records.message_of(record) for record in unique if record["conversation_id"] in alive]
        if len(rows) < len(unique):
            logger.info("messages_of_deleted_conversations_dropped", count=len(unique) - len(rows))
        if not rows:
            return 0
        inserted = _insert(rows)
        latest: dict[str, Any] = {}
        for row in rows:
            key = str(row.conversation_id)
            if key not in latest or row.created_at > latest[key]:
                latest[key] = row.created_at
        values = ", ".join(["(%s, %s::timestamptz)"] * len(latest))
        params = [item for pair in latest.items() for item in pair]
        with connection.cursor() as cursor:
            cursor.execute(_TOUCH_SQL.format(conversation=Conversation._meta.db_table, values=values), params)
    return inserted


_INSERT_SQL = "INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT (id) DO NOTHING RETURNING 1"


def _insert(rows: list[Message]) -> int:
    """``INSERT … ON CONFLICT (id) DO NOTHING`` in statements of ``MAX_BATCH_SIZE`` rows; returns
    the rows actually inserted (Django's bulk_create cannot tell them from the skipped ones)."""
    fields = [Message._meta.get_field(name) for name in _COLUMNS]
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    inserted = 0
    with connection.cursor() as cursor:
        for start in range(0, len(rows), MAX_BATCH_SIZE):
            batch = rows[start : start + MAX_BATCH_SIZE]
            params = [
                field.get_db_prep_save(getattr(row, field.attname), connection) for row in batch for field in fields
            ]
            sql = _INSERT_SQL.format(
                table=Message._meta.db_table, columns=columns, values=", ".join([placeholders] * len(batch))
            )
            cursor.execute(sql, params)
            inserted += len(cursor.fetchall())
    return inserted


# --- flushing (Celery beat) --------------------------------------------------------------------


def _ensure_group(client: redis.Redis) -> None:
    try:
        client.xgroup_create(WRITE_STREAM, FLUSH_GROUP, id="0", mkstream=True)
    except redis.exceptions.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def _read(client: redis.Redis, *, consumer: str, batch_size: int, claim_idle_ms: int) -> list[tuple[bytes, dict]]:
    """Entries of dead flushers first, then new ones."""
    claimed = client.xautoclaim(WRITE_STREAM, FLUSH_GROUP, consumer, min_idle_time=claim_idle_ms, count=batch_size)
    entries = [entry for entry in claimed[1] if entry and entry[1]]
    room = batch_size - len(entries)
    if room > 0:
        response = client.xreadgroup(FLUSH_GROUP, consumer, {WRITE_STREAM: ">"}, count=room)
        for _stream_name, new_entries in response or []:
            entries += new_entries
    return entries


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
        try:
            entries = _read(client, consumer=consumer, batch_size=batch_size, claim_idle_ms=int(idle * 1000))
        except redis.exceptions.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            _ensure_group(client)
            entries = _read(client, consumer=consumer, batch_size=batch_size, claim_idle_ms=int(idle * 1000))
        if not entries:
            break
        written += _write_entries(client, entries)
        if len(entries) < batch_size:
            break
    return written


def _write_entries(client: redis.Redis, entries: list[tuple[bytes, dict]]) -> int:
    by_schema: dict[str, list[dict[str, Any]]] = defaultdict(list)
    dead: list[tuple[bytes, dict]] = []
    for entry_id, fields in entries:
        try:
            by_schema[fields[b"s"].decode()].append(message_records.loads(fields[b"m"]))
        except (KeyError, ValueError, TypeError) as error:
            logger.error("message_entry_malformed", entry_id=entry_id.decode(), error=str(error))
            dead.append((entry_id, fields))
    written = 0
    for schema_name, records in by_schema.items():
        try:
            written += messages_write(schema_name=schema_name, records=records)  # commits before the ack
        except DatabaseError:
            if _schema_exists(schema_name):
                raise  # the database is in trouble: leave the entries pending for the next flush
            logger.warning("messages_of_deleted_tenant_dropped", tenant=schema_name, count=len(records))
    ids = [entry_id for entry_id, _fields in entries]
    with client.pipeline(transaction=True) as pipe:
        for entry_id, fields in dead:
            pipe.xadd(DEAD_LETTER_STREAM, {**fields, b"source_id": entry_id}, maxlen=10_000, approximate=True)
        pipe.xack(WRITE_STREAM, FLUSH_GROUP, *ids)
        pipe.xdel(WRITE_STREAM, *ids)  # the stream holds only what is still to write
        pipe.execute()
    return written


def _schema_exists(schema_name: str) -> bool:
    from tenants.models import Tenant

    return Tenant.objects.filter(schema_name=schema_name).exists()


def messages_backlog() -> int:
    """Messages waiting to be written (new and pending): a gauge for the flusher's health."""
    return int(get_redis().xlen(WRITE_STREAM))
