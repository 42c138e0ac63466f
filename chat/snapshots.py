"""A bot's settings as the hot paths use them: read from PostgreSQL once per configuration epoch
(tenants.config_epoch) and process, then served from memory.

The OpenAI edge admits and enqueues a turn, and a generation worker builds its prompt, without a
query for the bot or its knowledge bases: every change to either replaces the epoch, so the next
turn on any replica reads the new settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from chat.models import Bot
from tenants.asyncdb import in_tenant
from tenants.config_epoch import EpochCache


@dataclass(frozen=True, slots=True)
class BotSnapshot:
    schema_name: str
    pk: int
    public_id: str
    version: int
    system_prompt: str
    provider_route: dict
    generation: dict
    history_strategy: str
    history_window: int
    cache: dict
    rate_limits: dict
    knowledge: tuple[tuple[int, int], ...]  # (knowledge base id, its version), by id

    @property
    def knowledge_base_ids(self) -> list[int]:
        return [pk for pk, _version in self.knowledge]


_snapshots = EpochCache()
_NO_BOT = object()  # cached too: guessed ids must not cost a query each


def _load(*, schema_name: str, public_id: str | None, bot_id: int | None) -> BotSnapshot | None:
    """From PostgreSQL (two queries), in the active schema (``in_tenant`` sets it)."""
    if public_id is not None:
        bots = Bot.objects.filter(public_id=public_id)
    elif bot_id is not None:
        bots = Bot.objects.filter(pk=bot_id)
    else:
        return None  # no bot named: none found
    bot = bots.first()
    return None if bot is None else snapshot_of(bot, schema_name=schema_name)


def snapshot_of(bot: Bot, *, schema_name: str) -> BotSnapshot:
    """A bot's snapshot (one query: its knowledge bases' versions), in the active schema."""
    knowledge = tuple(sorted(bot.knowledge_bases.values_list("pk", "version")))
    return BotSnapshot(
        schema_name=schema_name,
        pk=bot.pk,
        public_id=bot.public_id,
        version=bot.version,
        system_prompt=bot.system_prompt,
        provider_route=bot.provider_route,
        generation=bot.generation or {},
        history_strategy=bot.history_strategy,
        history_window=bot.history_window,
        cache=bot.cache or {},
        rate_limits=bot.rate_limits or {},
        knowledge=knowledge,
    )


async def bot_snapshot_get(
    *, schema_name: str, epoch: bytes, public_id: str | None = None, bot_id: int | None = None
) -> BotSnapshot | None:
    """The bot of this epoch, from memory, or from PostgreSQL on the epoch's first use here."""
    key = (schema_name, "public_id", public_id) if public_id is not None else (schema_name, "id", bot_id)
    snapshot = _snapshots.get(epoch, key)
    if snapshot is None:
        snapshot = await in_tenant(schema_name, _load, schema_name=schema_name, public_id=public_id, bot_id=bot_id)
        if snapshot is None:
            _snapshots.put(epoch, key, _NO_BOT)
            return None
        _snapshots.put(epoch, (schema_name, "public_id", snapshot.public_id), snapshot)
        _snapshots.put(epoch, (schema_name, "id", snapshot.pk), snapshot)
    return None if snapshot is _NO_BOT else snapshot
