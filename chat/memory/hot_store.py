"""Each conversation's recent messages in Redis: read on every turn, so that any web process or
generation worker has the conversation's context without a database query.

Two keys per conversation (one hash tag, so they share a Redis Cluster slot):

- ``…:{conversation}:recent`` — a list of message records (chat.memory.records), oldest first,
  capped at ``PARLEY_HOT_STORE_MESSAGES``;
- ``…:{conversation}:complete`` — present when the list holds every message of the conversation
  up to its cap (the conversation began with it, or it was merged with PostgreSQL's rows).

Messages are appended as they finish, before they reach PostgreSQL (batched persistence), so the
list is newer than the database. A conversation whose list was evicted or expired starts a new
list with its next message, without the flag; the next read merges PostgreSQL's rows into it (in
one Lua script, so appends racing with the merge are kept). Both keys expire with the tenant's
conversation retention, renewed by every append.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings

from chat.memory import records as message_records
from tenants.config_epoch import EPOCH_KEY
from tenants.redis import get_redis, lua_source, script_queue, tenant_key

# Appends records; a new conversation's list is complete from its first message.
_APPEND = lua_source("chat/lua/hot_store_append.lua")

# Merges the database's newest rows (ARGV[3..], oldest first) with what the list holds (appended
# meanwhile, perhaps not yet in the database), de-duplicated by id, ordered by (ts, id), capped.
_MERGE = lua_source("chat/lua/hot_store_merge.lua")


def _keys(schema_name: str, conversation_id: str) -> tuple[str, str]:
    base = tenant_key(schema_name, "conv", "{" + str(conversation_id) + "}")
    return f"{base}:recent", f"{base}:complete"


def capacity() -> int:
    return settings.PARLEY_HOT_STORE_MESSAGES


def ttl_seconds(retention_days: int | None = None) -> int:
    days = retention_days or settings.PARLEY_CONVERSATION_RETENTION_DAYS
    return int(days) * 86_400


def hot_append(
    pipe,
    *,
    schema_name: str,
    conversation_id: str,
    records: Sequence[dict[str, Any]],
    is_new_conversation: bool = False,
    retention_days: int | None = None,
    by_sha: bool = False,
) -> None:
    """Queue the append on ``pipe`` (a redis pipeline, sync or asyncio): one round trip with the
    rest of the turn's Redis writes. ``by_sha``: the script by its SHA1, for an asyncio pipeline
    without a transaction run by ``tenants.redis.execute_with_scripts``."""
    recent, complete = _keys(schema_name, conversation_id)
    (partial(script_queue, pipe) if by_sha else pipe.eval)(
        _APPEND,
        2,
        recent,
        complete,
        capacity(),
        ttl_seconds(retention_days),
        "1" if is_new_conversation else "0",
        *(message_records.dumps(record) for record in records),
    )


@dataclass(frozen=True, slots=True)
class Recent:
    records: list[dict[str, Any]]  # oldest first
    from_database: bool  # the hot store lacked the conversation (a miss)


def hot_recent(
    *,
    schema_name: str,
    conversation_id: str,
    limit: int,
    load_newest: Callable[[int], list[dict[str, Any]]],
    client=None,
) -> Recent:
    """The conversation's newest ``limit`` messages (``limit`` ≤ the store's capacity).

    ``load_newest(n)`` returns the database's newest ``n`` records, oldest first; it runs only on
    a miss, and its rows are merged into the store for the next turn.
    """
    client = client or get_redis()
    recent, complete = _keys(schema_name, conversation_id)
    with client.pipeline(transaction=False) as pipe:
        pipe.lrange(recent, -limit, -1)
        pipe.exists(complete)
        raw, is_complete = pipe.execute()
    if is_complete:
        return Recent([message_records.loads(item) for item in raw], from_database=False)
    rows = load_newest(capacity())
    client.eval(
        _MERGE,
        2,
        recent,
        complete,
        capacity(),
        ttl_seconds(),
        *(message_records.dumps(record) for record in rows),
    )
    merged = client.lrange(recent, -limit, -1)
    return Recent([message_records.loads(item) for item in merged], from_database=True)


async def hot_recent_if_complete(
    *, schema_name: str, conversation_id: str, limit: int, client
) -> tuple[list[dict[str, Any]] | None, bytes | None]:
    """The newest ``limit`` messages when the store holds the whole recent conversation (None on
    a miss, for the caller's database path), and the configuration epoch (tenants.config_epoch)
    read in the same round trip on an asyncio client."""
    recent, complete = _keys(schema_name, conversation_id)
    async with client.pipeline(transaction=False) as pipe:
        pipe.lrange(recent, -limit, -1)
        pipe.exists(complete)
        pipe.get(EPOCH_KEY)
        raw, is_complete, epoch = await pipe.execute()
    if not is_complete:
        return None, epoch
    return [message_records.loads(item) for item in raw], epoch


def hot_forget(*, schema_name: str, conversation_ids: Sequence[str], client=None) -> int:
    """Drop conversations from the store (deleted or purged)."""
    if not conversation_ids:
        return 0
    client = client or get_redis()
    keys = [key for conversation_id in conversation_ids for key in _keys(schema_name, conversation_id)]
    return int(client.unlink(*keys))
