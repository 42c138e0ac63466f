"""The configuration epoch: when any replica may reuse what it read of the configuration.

Hot paths (the OpenAI edge, the generation workers) keep the configuration they read from
PostgreSQL — a bot's settings, a tenant's billing policy — in process memory, keyed by the
current *epoch*: a random token in Redis that every write of such configuration replaces
(``config_changed``, called by model signals and by the few queryset updates that bypass them).
A request reads the epoch in the Redis round trip it makes anyway (the API-key lookup, the
turn's history), so a change takes effect on the next request on every replica, with no SQL on
the hot path in between and no per-object invalidation to forget.

The token is random, not a counter: after Redis loses its data (a restart, FLUSHDB in the
tests) the next reader creates a new token that no process has cached anything under.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, cast

import structlog
from django.db import transaction

from tenants.errors import ServiceUnavailable
from tenants.redis import REDIS_UNAVAILABLE, get_redis

logger = structlog.get_logger(__name__)

EPOCH_KEY = "parley:config:epoch"
LOCAL_ENTRIES = 10_000  # per cache, per process: least recently used entries go first


def _new_token() -> bytes:
    return secrets.token_hex(8).encode()


def config_changed() -> None:
    """Every process's cached configuration is stale: now, and again once the surrounding
    transaction commits (a reader racing the write could otherwise cache the old rows under the
    new epoch).

    With Redis unreachable the change is refused (ServiceUnavailable, 503, raised inside the
    writer's transaction, which rolls it back): saved, it would stay invisible to every replica
    that cached the old configuration — a revoked key, a lowered budget — until the next change.
    The second replacement, after the commit, only logs a failure: the first one has already
    made every cache stale."""
    redis = get_redis()
    try:
        redis.set(EPOCH_KEY, _new_token())
    except REDIS_UNAVAILABLE as error:
        logger.warning("config_epoch_unavailable", error=repr(error))
        raise ServiceUnavailable(
            "Configuration changes are unavailable while the cache (Redis) cannot be reached; nothing "
            "was changed. Please try again shortly.",
            code="config_store_unavailable",
        ) from error
    transaction.on_commit(lambda: redis.set(EPOCH_KEY, _new_token()), robust=True)


def epoch_sync() -> bytes:
    redis = get_redis()
    value = cast(bytes | None, redis.get(EPOCH_KEY))
    if value is None:
        token = _new_token()
        return token if redis.set(EPOCH_KEY, token, nx=True) else (cast(bytes | None, redis.get(EPOCH_KEY)) or token)
    return value


async def epoch_async(redis, value: bytes | None = None, *, fetched: bool = False) -> bytes:
    """The epoch (``value`` when the caller read it in a batch already: ``fetched``)."""
    if not fetched:
        value = await redis.get(EPOCH_KEY)
    if value is None:
        token = _new_token()
        return token if await redis.set(EPOCH_KEY, token, nx=True) else (await redis.get(EPOCH_KEY) or token)
    return value


class EpochCache:
    """A bounded process-local map whose entries are valid for one epoch only."""

    def __init__(self, size: int = LOCAL_ENTRIES) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._epoch: bytes | None = None
        self._lock = threading.Lock()  # the ORM fallbacks fill it from worker threads

    def get(self, epoch: bytes, key: Hashable) -> Any | None:
        with self._lock:
            if epoch != self._epoch:
                return None
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, epoch: bytes, key: Hashable, value: Any) -> None:
        with self._lock:
            if epoch != self._epoch:
                self._entries.clear()
                self._epoch = epoch
            self._entries[key] = value
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._epoch = None


def _changed(**_kwargs) -> None:
    config_changed()


def config_models_watch(*models, m2m_through=()) -> None:
    """Replace the epoch whenever one of ``models`` is saved or deleted (or an m2m ``through``
    changes). Called from the apps' ``ready()`` for the models the hot paths cache."""
    from django.db.models.signals import m2m_changed, post_delete, post_save

    for model in models:
        post_save.connect(_changed, sender=model, weak=False, dispatch_uid=f"config-epoch-save-{model._meta.label}")
        post_delete.connect(_changed, sender=model, weak=False, dispatch_uid=f"config-epoch-del-{model._meta.label}")
    for through in m2m_through:
        m2m_changed.connect(
            _changed, sender=through, weak=False, dispatch_uid=f"config-epoch-m2m-{through._meta.label}"
        )
