"""A message as a JSON-safe record: what the hot store keeps and the write stream carries.

``ts`` (microseconds since the epoch) orders records exactly as ``(created_at, id)`` orders rows.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

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


def message_of(record: dict[str, Any]) -> Message:
    """An unsaved Message with the record's values (its primary key included)."""
    values = {name: record[name] for name in FIELDS if name in record}
    return Message(
        id=uuid.UUID(record["id"]),
        conversation_id=uuid.UUID(record["conversation_id"]),
        created_at=EPOCH + record["ts"] * MICROSECOND,
        **values,
    )


def dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


def loads(raw: bytes | str) -> dict[str, Any]:
    return json.loads(raw)
