"""Provider routes from plain configuration, validated, and cached per event loop.

A bot's ``provider_route`` is a dict::

    {
        "targets": [                                   # tried in order; 1 to 8 of them
            {"kind": "local"},
            {"kind": "openai", "base_url": "https://api.openai.com/v1", "api_key": "sk-…", "model": "gpt-4o-mini"},
            {"kind": "vllm_pool", "endpoints": ["http://vllm-0:8000", "http://vllm-1:8000"], "model": "llama-3.1-8b"},
        ],
        "timeout": 20,                                 # optional: seconds to the first token
        "circuit": {"failure_threshold": 5, "cooldown_seconds": 30},   # optional
    }

Every target takes an optional ``name`` (metrics label, shown as "provider" on messages) and
``timeout``; ``openai`` and ``vllm_pool`` targets take ``client`` ("sdk" or "aiohttp"; see
``chat.providers.openai_compat`` for why they differ); see ``TARGET_FIELDS`` for the rest.
:func:`validate_route_config` raises :class:`~tenants.errors.ValidationFailed` naming the bad
field; :func:`build_route` returns the ready :class:`~chat.providers.routing.ProviderRoute`,
reusing one per configuration and loop so that connection pools and pool scrapers are shared by
every turn.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from django.conf import settings

from chat.providers.base import Provider
from chat.providers.circuit import CircuitBreaker, CircuitPolicy, RedisCircuitStore, circuit_key
from chat.providers.local import DEFAULT_SECONDS_PER_WORD, LocalProvider
from chat.providers.openai_compat import CLIENTS, DEFAULT_CONNECT_TIMEOUT_SECONDS, openai_compat_provider
from chat.providers.routing import ProviderRoute, Target
from chat.providers.vllm_pool import DEFAULT_SCRAPE_INTERVAL_SECONDS, VllmPoolProvider
from tenants.errors import ValidationFailed
from tenants.outbound import OutboundRefused, validate_outbound_url
from tenants.redis import get_async_redis

MAX_TARGETS = 8
MAX_POOL_ENDPOINTS = 64
MAX_TIMEOUT_SECONDS = 600.0
MIN_SCRAPE_INTERVAL_SECONDS = 1.0
# The SDK is the reference client for hosted APIs; pools of self-hosted vLLM replicas exist for
# throughput, where the SDK's per-request CPU (see chat.providers.openai_compat) would dominate.
DEFAULT_OPENAI_CLIENT = "sdk"
DEFAULT_POOL_CLIENT = "aiohttp"
ROUTES_PER_LOOP = 256  # distinct configurations kept warm per process; the least recently used is closed
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}$")


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True, slots=True)
class FieldRule:
    kind: str  # "number", "integer", "string", "secret", "url", "urls", "headers", "name", "client"
    is_required: bool = False
    minimum: float | None = None
    maximum: float | None = None


_TIMEOUT = FieldRule("number", minimum=0.001, maximum=MAX_TIMEOUT_SECONDS)
_COMMON = {"kind": FieldRule("string", is_required=True), "name": FieldRule("name"), "timeout": _TIMEOUT}
TARGET_FIELDS: dict[str, dict[str, FieldRule]] = {
    "local": {**_COMMON, "seconds_per_word": FieldRule("number", minimum=0, maximum=1)},
    "openai": {
        **_COMMON,
        "base_url": FieldRule("url", is_required=True),
        "model": FieldRule("string", is_required=True),
        "api_key": FieldRule("secret"),
        "connect_timeout": _TIMEOUT,
        "headers": FieldRule("headers"),
        "client": FieldRule("client"),
    },
    "vllm_pool": {
        **_COMMON,
        "endpoints": FieldRule("urls", is_required=True),
        "model": FieldRule("string", is_required=True),
        "api_key": FieldRule("secret"),
        "connect_timeout": _TIMEOUT,
        # Probes go to tenant-chosen hosts: at most two GETs per endpoint a second.
        "scrape_interval": FieldRule("number", minimum=MIN_SCRAPE_INTERVAL_SECONDS, maximum=60),
        "affinity_slack": FieldRule("number", minimum=0, maximum=1000),
        "client": FieldRule("client"),
    },
}
ROUTE_FIELDS = {"targets", "timeout", "circuit"}
CIRCUIT_FIELDS = {
    "failure_threshold": FieldRule("integer", minimum=1, maximum=1000),
    "cooldown_seconds": FieldRule("number", minimum=0, maximum=3600),
}


def _join(prefix: str, name: str | int) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _fail(param: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"{param}: {message}", param=param)


def _clean_value(value: Any, rule: FieldRule, param: str) -> Any:
    if rule.kind in ("number", "integer"):
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or (rule.kind == "integer" and not isinstance(value, int)):
            raise _fail(param, f"must be {'an integer' if rule.kind == 'integer' else 'a number'}.")
        if rule.minimum is not None and value < rule.minimum:
            raise _fail(param, f"must be at least {rule.minimum:g}.")
        if rule.maximum is not None and value > rule.maximum:
            raise _fail(param, f"must be at most {rule.maximum:g}.")
        return value
    if rule.kind in ("string", "secret", "name"):
        if not isinstance(value, str) or not value.strip() or len(value) > 512:
            raise _fail(param, "must be a non-empty string of at most 512 characters.")
        if rule.kind == "name" and not _NAME.match(value):
            raise _fail(param, "must be 1 to 64 letters, digits or _.:@/- and start with a letter or digit.")
        return value
    if rule.kind == "client":
        if value not in CLIENTS:
            raise _fail(param, f"must be one of {', '.join(CLIENTS)}.")
        return value
    if rule.kind == "url":
        return _clean_url(value, param)
    if rule.kind == "urls":
        if not isinstance(value, list) or not value or len(value) > MAX_POOL_ENDPOINTS:
            raise _fail(param, f"must be a list of 1 to {MAX_POOL_ENDPOINTS} URLs.")
        urls = [_clean_url(url, _join(param, index)) for index, url in enumerate(value)]
        if len({url.rstrip("/") for url in urls}) != len(urls):
            raise _fail(param, "lists an endpoint twice.")
        return urls
    if rule.kind == "headers":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _fail(param, "must be an object of header names to string values.")
        return dict(value)
    raise AssertionError(rule.kind)


def _clean_url(value: Any, param: str) -> str:
    try:
        return validate_outbound_url(value)  # no internal addresses unless the operator allows them
    except OutboundRefused as error:
        raise _fail(param, str(error)) from None


def _clean_fields(data: Any, rules: dict[str, FieldRule], param: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(param, "must be an object.")
    unknown = sorted(set(data) - set(rules))
    if unknown:
        raise _fail(_join(param, unknown[0]), f"is not a setting here (known: {', '.join(sorted(rules))}).")
    cleaned = {}
    for name, rule in rules.items():
        if name in data:
            cleaned[name] = _clean_value(data[name], rule, _join(param, name))
        elif rule.is_required:
            raise _fail(_join(param, name), "is required.")
    return cleaned


def validate_route_config(config: Any, *, param_prefix: str = "") -> dict[str, Any]:
    """The route configuration, checked and normalised; :class:`ValidationFailed` names the bad field.

    ``param_prefix`` (e.g. ``"provider_route"``) is put in front of the field paths in errors.
    """
    if not isinstance(config, dict):
        raise _fail(param_prefix or "provider_route", "must be an object with a 'targets' list.")
    unknown = sorted(set(config) - ROUTE_FIELDS)
    if unknown:
        raise _fail(
            _join(param_prefix, unknown[0]), f"is not a setting here (known: {', '.join(sorted(ROUTE_FIELDS))})."
        )
    targets_param = _join(param_prefix, "targets")
    targets = config.get("targets")
    if not isinstance(targets, list) or not targets or len(targets) > MAX_TARGETS:
        raise _fail(targets_param, f"must be a list of 1 to {MAX_TARGETS} targets.")
    cleaned: dict[str, Any] = {"targets": []}
    names: set[str] = set()
    for index, target in enumerate(targets):
        param = _join(targets_param, index)
        kind = target.get("kind") if isinstance(target, dict) else None
        if kind not in TARGET_FIELDS:
            raise _fail(_join(param, "kind"), f"must be one of {', '.join(TARGET_FIELDS)}.")
        target_cleaned = _clean_fields(target, TARGET_FIELDS[kind], param)
        name = target_cleaned.get("name")
        if name is not None and name in names:
            raise _fail(_join(param, "name"), f"{name!r} names another target of this route already.")
        names.add(name or "")
        cleaned["targets"].append(target_cleaned)
    if "timeout" in config:
        cleaned["timeout"] = _clean_value(config["timeout"], _TIMEOUT, _join(param_prefix, "timeout"))
    if "circuit" in config:
        cleaned["circuit"] = _clean_fields(config["circuit"], CIRCUIT_FIELDS, _join(param_prefix, "circuit"))
    return cleaned


# ---------------------------------------------------------------------------------------------
# Construction


def _default_target_name(target: dict[str, Any]) -> str:
    kind = target["kind"]
    if kind == "openai":
        return f"openai:{urlsplit(target['base_url']).hostname}:{target['model']}"
    if kind == "vllm_pool":
        return f"vllm_pool:{target['model']}"
    return kind


def circuit_id(target: dict[str, Any]) -> str:
    """What identifies the upstream behind a target: equal upstreams (and keys) share one circuit."""
    identity = {key: target.get(key) for key in ("kind", "base_url", "endpoints", "model", "api_key")}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def _provider_for(target: dict[str, Any], *, name: str, default_timeout: float) -> Provider:
    kind = target["kind"]
    timeout = target.get("timeout", default_timeout)
    if kind == "local":
        return LocalProvider(seconds_per_word=target.get("seconds_per_word", _local_seconds_per_word()))
    if kind == "openai":
        return openai_compat_provider(
            client=target.get("client", DEFAULT_OPENAI_CLIENT),
            base_url=target["base_url"],
            api_key=target.get("api_key"),
            model=target["model"],
            timeout=timeout,
            connect_timeout=target.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_SECONDS),
            headers=target.get("headers"),
        )
    return VllmPoolProvider(
        endpoints=target["endpoints"],
        model=target["model"],
        api_key=target.get("api_key"),
        name=name,
        timeout=timeout,
        connect_timeout=target.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_SECONDS),
        scrape_interval=max(
            MIN_SCRAPE_INTERVAL_SECONDS, target.get("scrape_interval", DEFAULT_SCRAPE_INTERVAL_SECONDS)
        ),
        client=target.get("client", DEFAULT_POOL_CLIENT),
        **({"affinity_slack": target["affinity_slack"]} if "affinity_slack" in target else {}),
    )


def _local_seconds_per_word() -> float:
    return getattr(settings, "CHAT_LOCAL_SECONDS_PER_WORD", 0.0 if settings.IS_TEST else DEFAULT_SECONDS_PER_WORD)


def circuit_policy(config: dict[str, Any]) -> CircuitPolicy:
    circuit = config.get("circuit", {})
    return CircuitPolicy(
        failure_threshold=circuit.get("failure_threshold", getattr(settings, "CHAT_CIRCUIT_FAILURE_THRESHOLD", 5)),
        cooldown_seconds=circuit.get("cooldown_seconds", getattr(settings, "CHAT_CIRCUIT_COOLDOWN_SECONDS", 30.0)),
    )


def route_from_config(
    config: Any, *, breaker: CircuitBreaker | None = None, schema_name: str | None = None
) -> ProviderRoute:
    """A new route for ``config`` (validated here). ``breaker`` defaults to an in-memory one.

    ``schema_name`` puts the circuits' Redis keys under that tenant's prefix; by default circuits
    are platform-wide, shared by every bot that calls the same upstream with the same key.
    Local targets never fail, so they have no circuit.
    """
    cleaned = validate_route_config(config)
    default_timeout = cleaned.get("timeout", getattr(settings, "CHAT_PROVIDER_TIMEOUT_SECONDS", 30.0))
    targets: list[Target] = []
    names: set[str] = {target["name"] for target in cleaned["targets"] if "name" in target}
    for index, target in enumerate(cleaned["targets"]):
        name = target.get("name")
        if name is None:
            name = _default_target_name(target)
            if name in names:
                name = f"{name}#{index}"
            names.add(name)
        key = None if target["kind"] == "local" else circuit_key(circuit_id(target), schema_name=schema_name)
        provider = _provider_for(target, name=name, default_timeout=default_timeout)
        targets.append(Target(name=name, provider=provider, circuit_key=key))
    return ProviderRoute(
        targets,
        breaker=breaker or CircuitBreaker(policy=circuit_policy(cleaned)),
        first_token_timeout=default_timeout,
    )


@dataclass
class _LoopRoutes:
    redis: aioredis.Redis
    routes: OrderedDict[str, ProviderRoute] = field(default_factory=OrderedDict)


_loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopRoutes] = weakref.WeakKeyDictionary()


def build_route(config: Any, *, schema_name: str | None = None) -> ProviderRoute:
    """The route for ``config``, shared by every caller on this event loop, circuits in Redis.

    Cheap to call per turn: a configuration seen before costs one JSON encoding and a dict lookup.
    Outside a running loop it builds a fresh route each time (with nothing to share it with).
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return route_from_config(config, schema_name=schema_name)
    cache_key = json.dumps([config, schema_name], sort_keys=True, default=str)
    state = _loops.get(loop)
    if state is None:
        state = _loops[loop] = _LoopRoutes(redis=get_async_redis())
    route = state.routes.get(cache_key)
    if route is not None:
        state.routes.move_to_end(cache_key)
        return route
    cleaned = validate_route_config(config)
    breaker = CircuitBreaker(
        RedisCircuitStore(state.redis),
        policy=circuit_policy(cleaned),
        closed_cache_seconds=getattr(settings, "CHAT_CIRCUIT_CACHE_SECONDS", 1.0),
    )
    route = state.routes[cache_key] = route_from_config(cleaned, breaker=breaker, schema_name=schema_name)
    if len(state.routes) > ROUTES_PER_LOOP:
        _, evicted = state.routes.popitem(last=False)
        task = loop.create_task(evicted.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    return route


_closing: set[asyncio.Task[None]] = set()  # strong references, so that closing tasks finish


async def routes_close() -> None:
    """Close the routes cached for the running loop (tests, worker shutdown)."""
    state = _loops.pop(asyncio.get_running_loop(), None)
    if state is None:
        return
    for route in state.routes.values():
        await route.aclose()
    await state.redis.aclose()
