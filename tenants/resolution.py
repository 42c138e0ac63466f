"""Cheap tenant resolution: host → tenant, API-key prefix → key + tenant, bot public id → tenant.

Each lookup is one Redis GET on the hot path (the database only on a miss), with negative
caching so that random hosts or guessed prefixes cannot hammer PostgreSQL. Every write that
changes what a lookup returns calls ``tenant_cache_invalidate`` / ``api_key_cache_invalidate``
(see services), so a suspension or revocation takes effect on the next request on every replica.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import orjson
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django_tenants.utils import get_public_schema_name

from tenants.config_epoch import EPOCH_KEY, epoch_async
from tenants.models import ApiKey, Domain, PublicBot, Tenant
from tenants.redis import get_redis

_MISSING = b"-"  # negative-cache marker
_NEGATIVE_TTL = 30
_TENANT_FIELDS = ("id", "schema_name", "slug", "name", "status", "plan_id")


_BOT_PATH = re.compile(r"^/(?:api/v1/widget|ws)/bots/(?P<public_id>[A-Za-z0-9_-]{4,40})/")
_BOT_PUBLIC_ID = re.compile(r"[A-Za-z0-9_-]{4,40}")
# A DNS host name (RFC 1123 labels, 253 characters at most): anything else names no tenant and is
# never looked up — the ASGI and WebSocket edges read Host without Django's validation.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")


def tenant_hostname(host: str) -> str | None:
    """A request's Host header reduced to what could name a tenant: no port, no ``www.``; None
    for the bare domain, IP addresses and empty hosts. Shared by the HTTP and WebSocket edges."""
    if not host or host.startswith("["):  # empty, or an IPv6 literal
        return None
    host = host.rsplit(":", 1)[0].lower().removeprefix("www.")
    if host == settings.PARLEY_BASE_DOMAIN or host.replace(".", "").isdigit() or not _HOSTNAME.fullmatch(host):
        return None
    return host


def is_bot_public_id(value: str) -> bool:
    """Whether ``value`` could be a widget bot's public id (checked before any lookup of it)."""
    return _BOT_PUBLIC_ID.fullmatch(value) is not None


def bot_public_id_from_path(path: str) -> str | None:
    """The widget bot id in ``/api/v1/widget/bots/<id>/…`` or ``/ws/bots/<id>/``."""
    match = _BOT_PATH.match(path)
    return match.group("public_id") if match else None


def _cache_key(kind: str, value: str) -> str:
    return f"parley:resolve:{kind}:{value}"


def _tenant_to_dict(tenant: Tenant) -> dict[str, Any]:
    return {field: getattr(tenant, field) for field in _TENANT_FIELDS}


def tenant_from_dict(data: dict[str, Any]) -> Tenant:
    tenant = Tenant(**{field: data[field] for field in _TENANT_FIELDS})
    tenant._state.adding = False
    return tenant


def public_tenant() -> Tenant:
    """The in-memory stand-in for the public schema (no row needed)."""
    tenant = Tenant(schema_name=get_public_schema_name(), slug="", name="Parley")
    tenant._state.adding = False
    return tenant


def _cached(kind: str, value: str, load, *, raw: bytes | None = None, fetched: bool = False) -> dict[str, Any] | None:
    # Raw redis-py on the process-wide pool: one GET, no pickling, on the hot path of every request.
    # ``fetched``: the caller already read ``raw`` (in a batched MGET).
    key = _cache_key(kind, value)
    redis = get_redis()
    if not fetched:
        raw = cast(bytes | None, redis.get(key))
    if raw == _MISSING:
        return None
    if raw is not None:
        return json.loads(raw)
    data = load()
    if data is None:
        redis.set(key, _MISSING, ex=_NEGATIVE_TTL)
        return None
    redis.set(key, json.dumps(data, default=str), ex=settings.PARLEY_RESOLUTION_CACHE_SECONDS)
    return data


def _host_loader(hostname: str):
    def load() -> dict[str, Any] | None:
        domain = Domain.objects.select_related("tenant").filter(domain=hostname).first()
        return _tenant_to_dict(domain.tenant) if domain else None

    return load


def tenant_resolve_by_host(hostname: str) -> Tenant | None:
    data = _cached("host", hostname, _host_loader(hostname))
    return tenant_from_dict(data) if data else None


def tenant_resolve_by_public_bot(public_id: str) -> Tenant | None:
    def load() -> dict[str, Any] | None:
        bot = PublicBot.objects.select_related("tenant").filter(public_id=public_id).first()
        return _tenant_to_dict(bot.tenant) if bot else None

    data = _cached("bot", public_id, load)
    return tenant_from_dict(data) if data else None


@dataclass(frozen=True)
class ApiKeyRecord:
    """What authentication needs to know about a key, without touching the database."""

    id: int
    prefix: str
    secret_hash: str
    scopes: tuple[str, ...]
    expires_at: datetime | None
    is_revoked: bool
    tenant: Tenant


def _key_loader(prefix: str):
    def load() -> dict[str, Any] | None:
        key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
        if key is None:
            return None
        return {
            "id": key.id,
            "prefix": key.prefix,
            "secret_hash": key.secret_hash,
            "scopes": list(key.scopes),
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
            "is_revoked": key.revoked_at is not None,
            "tenant": _tenant_to_dict(key.tenant),
        }

    return load


def api_key_resolve(prefix: str) -> ApiKeyRecord | None:
    return _record_from(_cached("key", prefix, _key_loader(prefix)))


def tenant_and_key_resolve(hostname: str | None, prefix: str | None) -> tuple[Tenant | None, ApiKeyRecord | None]:
    """Both edge lookups of a request in one Redis round trip (MGET); the database on misses."""
    names = [("host", hostname, _host_loader), ("key", prefix, _key_loader)]
    wanted = [(kind, value, loader) for kind, value, loader in names if value]
    if not wanted:
        return None, None
    raws = cast(list[bytes | None], get_redis().mget([_cache_key(kind, value) for kind, value, _loader in wanted]))
    found = {
        kind: _cached(kind, value, loader(value), raw=raw, fetched=True)
        for (kind, value, loader), raw in zip(wanted, raws, strict=True)
    }
    host_data = found.get("host")
    return (tenant_from_dict(host_data) if host_data else None), _record_from(found.get("key"))


def resolution_cache_keys(hostname: str | None, prefix: str | None) -> list[str]:
    """The resolution cache's entries that a request with this host and key prefix reads."""
    return [_cache_key(kind, value) for kind, value in (("host", hostname), ("key", prefix)) if value]


@dataclass(frozen=True, slots=True)
class EdgeResolution:
    tenant: Tenant | None
    record: ApiKeyRecord | None
    epoch: bytes
    extra: list  # the replies of what ``also`` queued
    # The cache entries read (None where the database answered): what the result came from.
    raws: tuple[bytes | None, ...]


async def tenant_and_key_resolve_async(hostname: str | None, prefix: str | None, redis, *, also=None) -> EdgeResolution:
    """``tenant_and_key_resolve`` for the async edge, with the configuration epoch
    (tenants.config_epoch) read in the same round trip — and whatever ``also(pipe)`` queues
    (its replies are returned last); the database (in a thread) on misses."""
    names = [(kind, value) for kind, value in (("host", hostname), ("key", prefix)) if value]
    async with redis.pipeline(transaction=False) as pipe:
        pipe.mget([*resolution_cache_keys(hostname, prefix), EPOCH_KEY])
        if also is not None:
            also(pipe)
        (*raws, epoch), *extra = await pipe.execute(raise_on_error=False)
    epoch = await epoch_async(redis, epoch, fetched=True)
    if any(raw is None for raw in raws):  # not cached yet: the loaders, once
        tenant, record = await sync_to_async(tenant_and_key_resolve, thread_sensitive=True)(hostname, prefix)
        return EdgeResolution(tenant, record, epoch, extra, raws=(None,) * len(raws))
    found = {
        kind: (None if raw == _MISSING else orjson.loads(raw)) for (kind, _value), raw in zip(names, raws, strict=True)
    }
    host_data = found.get("host")
    tenant = tenant_from_dict(host_data) if host_data else None
    return EdgeResolution(tenant, _record_from(found.get("key")), epoch, extra, raws=tuple(raws))


def _record_from(data: dict[str, Any] | None) -> ApiKeyRecord | None:
    if data is None:
        return None
    return ApiKeyRecord(
        id=data["id"],
        prefix=data["prefix"],
        secret_hash=data["secret_hash"],
        scopes=tuple(data["scopes"]),
        expires_at=datetime.fromisoformat(data["expires_at"]) if data["expires_at"] else None,
        is_revoked=data["is_revoked"],
        tenant=tenant_from_dict(data["tenant"]),
    )


def _forget(keys: list[str]) -> None:
    # Now, and again once the surrounding transaction commits: a request racing the write
    # could otherwise re-cache the old state in between.
    if not keys:
        return
    redis = get_redis()
    redis.delete(*keys)
    transaction.on_commit(lambda: redis.delete(*keys))


def api_key_cache_invalidate(prefix: str) -> None:
    _forget([_cache_key("key", prefix)])


def public_bot_cache_invalidate(public_id: str) -> None:
    _forget([_cache_key("bot", public_id)])


def tenant_cache_invalidate(tenant: Tenant) -> None:
    """Forget every cached lookup that embeds this tenant (hosts, keys, public bot ids).

    Call it before deleting the tenant's rows: it reads them to know what to forget."""
    keys = [_cache_key("host", d) for d in Domain.objects.filter(tenant=tenant).values_list("domain", flat=True)]
    keys += [_cache_key("key", p) for p in ApiKey.objects.filter(tenant=tenant).values_list("prefix", flat=True)]
    keys += [_cache_key("bot", b) for b in PublicBot.objects.filter(tenant=tenant).values_list("public_id", flat=True)]
    _forget(keys)
