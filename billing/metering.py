"""Usage metering: every request's usage goes to a Redis Stream on the hot path and is written to
PostgreSQL in batches by ``usage_flush`` (a Celery beat task every ~2 s).

Delivery is at least once, the effect exactly once:

* ``usage_record`` appends one entry (XADD, the stream capped at ``BILLING_USAGE_STREAM_MAXLEN``
  entries, approximately, so that a stopped flusher cannot fill Redis). When Redis is unreachable
  the event is written to PostgreSQL synchronously instead, so no usage is lost.
* ``usage_flush`` reads a batch through a consumer group, inserts the rows with
  ``ON CONFLICT (event_id) DO NOTHING`` and, in the same statement, adds only the rows actually
  inserted (``RETURNING``) to the daily aggregates with an atomic upsert. It acknowledges (and
  deletes) the entries only after the commit; entries of a flusher that died before
  acknowledging are claimed by the next one (XAUTOCLAIM) and re-inserted harmlessly.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import orjson
import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone
from prometheus_client import Counter

from tenants.batches import write_isolating
from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis, get_redis, stream_batch_read

logger = structlog.get_logger(__name__)

USAGE_STREAM = "parley:usage"
USAGE_DEAD_LETTER_STREAM = "parley:usage:dead"
USAGE_DEAD_LETTERED = Counter(
    "parley_usage_dead_lettered",
    "Usage events the batch writer could not store (malformed, or refused by PostgreSQL), moved to "
    "the dead-letter stream with their error.",
)
USAGE_GROUP = "usage-flush"
# ~12 hours of a busy platform (20 requests/s); an entry is a few hundred bytes.
DEFAULT_STREAM_MAXLEN = 1_000_000
# A flush takes well under a second: entries pending this long belong to a flusher that died.
DEFAULT_CLAIM_IDLE_SECONDS = 60
# 15 columns a row: 4,000 rows stay well under PostgreSQL's 65,535 parameters per statement.
MAX_BATCH_SIZE = 4_000
MAX_TOKENS = 2**31 - 1  # the columns are PostgreSQL integers


@dataclass(frozen=True, slots=True)
class UsageEvent:
    event_id: str  # idempotency key: the assistant message id / generation id
    tenant_schema: str
    bot: str  # the bot's public id ("" if none)
    api_key_id: int | None
    end_user: str  # "key:12:alice", "visitor:abc", "user:5"
    provider: str
    model: str
    tokens_in: int
    tokens_out: int
    cached: bool
    cache_layer: str  # "", "exact", "semantic"
    latency_ms: float
    ttft_ms: float | None
    occurred_at: datetime

    def __post_init__(self) -> None:
        # Checked here, on the hot path, so that the flusher never meets a row PostgreSQL would
        # refuse: one such row would fail its whole batch on every retry.
        if not isinstance(self.event_id, str) or not 0 < len(self.event_id) <= 100:
            raise ValueError("event_id must be 1-100 characters")
        for name in ("tenant_schema", "bot", "end_user", "provider", "model", "cache_layer"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        for name in ("tokens_in", "tokens_out"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
                raise ValueError(f"token counts must be whole numbers from 0 to {MAX_TOKENS:,}")
        if self.api_key_id is not None and (isinstance(self.api_key_id, bool) or not isinstance(self.api_key_id, int)):
            raise ValueError("api_key_id must be an integer or None")
        if not isinstance(self.occurred_at, datetime) or self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be a timezone-aware datetime")

    @property
    def billable_tokens(self) -> int:
        """Tokens counted against budgets and invoices: none for an answer served from the cache."""
        return 0 if self.cached else self.tokens_in + self.tokens_out

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # a dataclass, its datetime in ISO 8601 (what from_json reads)

    @classmethod
    def from_json(cls, raw: str | bytes) -> UsageEvent:
        data = orjson.loads(raw)
        data["occurred_at"] = datetime.fromisoformat(data["occurred_at"])
        return cls(**data)


def _stream() -> str:
    return getattr(settings, "BILLING_USAGE_STREAM", USAGE_STREAM)


def _maxlen() -> int:
    return getattr(settings, "BILLING_USAGE_STREAM_MAXLEN", DEFAULT_STREAM_MAXLEN)


def default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- recording (hot path) -----------------------------------------------------------------------


def usage_record(event: UsageEvent) -> None:
    """Queue one request's usage for the batch writer; PostgreSQL directly if Redis is down."""
    try:
        get_redis().xadd(_stream(), {"e": event.to_json()}, maxlen=_maxlen(), approximate=True)
    except REDIS_UNAVAILABLE as error:
        logger.warning("usage_stream_unavailable", event_id=event.event_id, error=str(error))
        usage_write(events=[event])


def usage_record_queue(pipe, event: UsageEvent) -> None:
    """``usage_record`` queued on ``pipe`` (one round trip with a turn's other end-of-turn writes)."""
    pipe.xadd(_stream(), {"e": event.to_json()}, maxlen=_maxlen(), approximate=True)


async def usage_record_async(event: UsageEvent) -> None:
    """``usage_record`` for async code (generation workers, SSE views): never blocks the loop."""
    try:
        await get_loop_redis().xadd(_stream(), {"e": event.to_json()}, maxlen=_maxlen(), approximate=True)
    except REDIS_UNAVAILABLE as error:
        logger.warning("usage_stream_unavailable", event_id=event.event_id, error=str(error))
        await sync_to_async(usage_write, thread_sensitive=True)(events=[event])


# --- writing (batch) ----------------------------------------------------------------------------

_RECORD_COLUMNS = (
    "event_id",
    "tenant_id",
    "occurred_at",
    "bot",
    "api_key_id",
    "end_user",
    "provider",
    "model",
    "tokens_in",
    "tokens_out",
    "cached",
    "cache_layer",
    "latency_ms",
    "ttft_ms",
    "recorded_at",
)

# One statement: insert the records, and fold exactly the inserted ones into the daily buckets.
# The buckets are upserted in key order so that two concurrent flushers lock rows in the same
# order (no deadlock); a data-modifying CTE runs to completion even though nothing reads it.
_WRITE_SQL = """
WITH inserted AS (
    INSERT INTO billing_usagerecord ({columns})
    VALUES {values}
    ON CONFLICT (event_id) DO NOTHING
    RETURNING tenant_id, occurred_at, bot, api_key_id, cached, tokens_in, tokens_out
), daily AS (
    INSERT INTO billing_usagedaily
        (tenant_id, day, bot, api_key_id, requests, cached_requests, tokens_in, tokens_out, cached_tokens)
    SELECT tenant_id, (occurred_at AT TIME ZONE 'UTC')::date, bot, COALESCE(api_key_id, 0),
           count(*), count(*) FILTER (WHERE cached), sum(tokens_in), sum(tokens_out),
           COALESCE(sum(tokens_in + tokens_out) FILTER (WHERE cached), 0)
    FROM inserted
    GROUP BY 1, 2, 3, 4
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (tenant_id, day, bot, api_key_id) DO UPDATE SET
        requests = billing_usagedaily.requests + excluded.requests,
        cached_requests = billing_usagedaily.cached_requests + excluded.cached_requests,
        tokens_in = billing_usagedaily.tokens_in + excluded.tokens_in,
        tokens_out = billing_usagedaily.tokens_out + excluded.tokens_out,
        cached_tokens = billing_usagedaily.cached_tokens + excluded.cached_tokens
)
SELECT count(*) FROM inserted
"""


def usage_write(*, events: Sequence[UsageEvent]) -> int:
    """Insert usage rows and add the new ones to the daily aggregates; returns rows inserted.

    Idempotent: an event already stored (same ``event_id``) is skipped and not counted again.
    Events of unknown tenants (deleted since) are dropped with a warning.
    """
    unique = list({event.event_id: event for event in events}.values())
    if not unique:
        return 0
    tenant_ids = _tenant_ids({event.tenant_schema for event in unique})
    now = timezone.now()
    written = 0
    with transaction.atomic():
        for start in range(0, len(unique), MAX_BATCH_SIZE):
            params: list[Any] = []
            rows = 0
            for event in unique[start : start + MAX_BATCH_SIZE]:
                tenant_id = tenant_ids.get(event.tenant_schema)
                if tenant_id is None:
                    logger.warning("usage_unknown_tenant", event_id=event.event_id, tenant=event.tenant_schema)
                    continue
                params += [
                    event.event_id,
                    tenant_id,
                    event.occurred_at,
                    event.bot[:40],
                    event.api_key_id,
                    event.end_user[:200],
                    event.provider[:100],
                    event.model[:200],
                    event.tokens_in,
                    event.tokens_out,
                    event.cached,
                    event.cache_layer[:20],
                    event.latency_ms,
                    event.ttft_ms,
                    now,
                ]
                rows += 1
            if not rows:
                continue
            placeholders = "(" + ", ".join(["%s"] * len(_RECORD_COLUMNS)) + ")"
            sql = _WRITE_SQL.format(columns=", ".join(_RECORD_COLUMNS), values=", ".join([placeholders] * rows))
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                written += cursor.fetchone()[0]
    return written


def _tenant_ids(schemas: set[str]) -> dict[str, int]:
    from tenants.models import Tenant

    return dict(Tenant.objects.filter(schema_name__in=schemas).values_list("schema_name", "id"))


# --- flushing (Celery beat) ---------------------------------------------------------------------


def _read(client: redis.Redis, *, consumer: str, batch_size: int) -> list[tuple[bytes, dict]]:
    """Stale entries of dead flushers first, then new ones."""
    idle_ms = int(getattr(settings, "BILLING_USAGE_CLAIM_IDLE_SECONDS", DEFAULT_CLAIM_IDLE_SECONDS) * 1000)
    entries, trimmed = stream_batch_read(
        client, _stream(), USAGE_GROUP, consumer=consumer, batch_size=batch_size, claim_idle_ms=idle_ms
    )
    if trimmed:  # entries trimmed from the stream while pending (MAXLEN): lost usage
        logger.error("usage_entries_trimmed_before_flush", count=len(trimmed))
    return entries


def usage_flush(*, batch_size: int = 1000, consumer: str | None = None, max_batches: int = 1) -> int:
    """Move usage from the Redis Stream to PostgreSQL, a batch at a time, until a batch comes back
    short or ``max_batches`` were written; returns rows written.

    Safe to run concurrently (each consumer of the group gets different entries) and to crash at
    any point: unacknowledged entries are claimed again after ``BILLING_USAGE_CLAIM_IDLE_SECONDS``
    and the insert skips what was already written.
    """
    batch_size = max(1, min(batch_size, MAX_BATCH_SIZE))
    consumer = consumer or default_consumer()
    client = get_redis()
    written = 0
    for _batch in range(max_batches):
        read, batch_written = _flush_batch(client, consumer=consumer, batch_size=batch_size)
        written += batch_written
        if read < batch_size:
            break
    return written


def _flush_batch(client: redis.Redis, *, consumer: str, batch_size: int) -> tuple[int, int]:
    """One batch: (entries read, rows written)."""
    entries = _read(client, consumer=consumer, batch_size=batch_size)
    if not entries:
        return 0, 0

    parsed: list[tuple[bytes, dict, UsageEvent]] = []
    dead: list[tuple[bytes, dict, str]] = []
    for entry_id, fields in entries:
        try:
            parsed.append((entry_id, fields, UsageEvent.from_json(fields[b"e"])))
        except (KeyError, ValueError, TypeError) as error:
            logger.error("usage_entry_malformed", entry_id=entry_id.decode(), error=str(error))
            dead.append((entry_id, fields, f"malformed: {error}"))

    # Commits before anything is acknowledged; an event PostgreSQL refuses is set aside (dead
    # letter) and the others are written (tenants.batches).
    written, refused = write_isolating(parsed, lambda batch: usage_write(events=[event for _, _, event in batch]))
    for refusal in refused:
        entry_id, fields, _event = refusal.item
        logger.error("usage_refused_by_postgres", entry_id=entry_id.decode(), error=refusal.error)
        dead.append((entry_id, fields, refusal.error))

    ids = [entry_id for entry_id, _fields in entries]
    with client.pipeline(transaction=True) as pipe:
        for entry_id, fields, reason in dead:
            entry = {**fields, b"source_id": entry_id, b"error": reason.encode()}
            pipe.xadd(USAGE_DEAD_LETTER_STREAM, entry, maxlen=10_000, approximate=True)
        pipe.xack(_stream(), USAGE_GROUP, *ids)
        # Acknowledged entries are deleted at once: the stream holds only what is still to write.
        pipe.xdel(_stream(), *ids)
        pipe.execute()
    if dead:
        USAGE_DEAD_LETTERED.inc(len(dead))
    return len(entries), written


def usage_backlog() -> int:
    """Entries waiting in the stream (new and pending): a gauge for monitoring the flusher."""
    return cast(int, get_redis().xlen(_stream()))
