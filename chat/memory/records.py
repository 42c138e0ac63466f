"""A message as a JSON-safe record: what the hot store keeps and the write stream carries.

``ts`` (microseconds since the epoch) orders records exactly as ``(created_at, id)`` orders rows.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from django.db.models import Field

from chat.models import Message

# Every stored column of a message (the conversation is the record's ``conversation_id``).
FIELDS = (
    "role",
    "content",
    "generation_id",
    "tokens_in",
    "tokens_out",
    "ttft_ms",
    "total_ms",
    "provider",
    "model",
    "is_cached",
    "cache_layer",
    "citations",
    "finish_reason",
)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def timestamp_of(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND  # exact, unlike float seconds


def record_of(message: Message) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": str(message.pk),
        "conversation_id": str(message.conversation_id),
        "ts": timestamp_of(message.created_at),
    }
    for name in FIELDS:
        value = getattr(message, name)
        record[name] = str(value) if isinstance(value, uuid.UUID) else value
    return record


# A new message's columns before anything is set: the model's defaults (``citations``' list is
# made afresh per record).
def _default(name: str) -> Any:
    field = Message._meta.get_field(name)
    assert isinstance(field, Field)  # FIELDS are the model's own columns, not reverse relations
    return field.get_default()


_DEFAULTS = {name: _default(name) for name in FIELDS if name != "citations"}


def record_new(
    *, conversation_id: str, role: str, content: str, ts: int, generation_id: str | None = None, **values: Any
) -> dict[str, Any]:
    """``record_of`` a new message, without building the model instance: the hot paths (the edge's
    turn start, the worker's answer) need only the record. ``values``: any other of ``FIELDS``."""
    unknown = values.keys() - _DEFAULTS.keys() - {"citations"}
    if unknown:
        raise TypeError(f"Not message fields: {sorted(unknown)}")
    return {
        "id": str(uuid.uuid4()),
        "conversation_id": conversation_id,
        "ts": ts,
        **_DEFAULTS,
        "role": role,
        "content": content,
        "generation_id": generation_id,
        "citations": [],
        **values,
    }


def message_of(record: dict[str, Any]) -> Message:
    """An unsaved Message with the record's values (its primary key included)."""
    values = {name: record[name] for name in FIELDS if name in record}
    return Message(
        id=uuid.UUID(record["id"]),
        conversation_id=uuid.UUID(record["conversation_id"]),
        created_at=EPOCH + record["ts"] * MICROSECOND,
        **values,
    )


def dumps(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record)


def loads(raw: bytes | str) -> dict[str, Any]:
    return orjson.loads(raw)
