"""Writes of the chat app: bots and conversations (a turn's writes live in chat.engine)."""

from __future__ import annotations

import secrets
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from chat.admission import validate_rate_limits
from chat.models import Bot, Conversation, Message, default_generation, default_provider_route
from chat.providers.registry import validate_route_config
from chat.response_cache import cache_settings_validate
from chat.widget import origin_normalise
from knowledge.models import KnowledgeBase
from tenants.config_epoch import config_changed
from tenants.connection import connection
from tenants.errors import ValidationFailed
from tenants.models import PublicBot
from tenants.outbound import OutboundRefused, validate_outbound_url
from tenants.resolution import public_bot_cache_invalidate
from tenants.services import public_bot_register

# Fields whose change alters answers: a change bumps Bot.version (response caches key on it).
ANSWER_FIELDS = frozenset(
    {"system_prompt", "provider_route", "generation", "history_strategy", "history_window", "knowledge_bases"}
)
GENERATION_LIMITS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 32_768),
    # The model's context window: history is fitted into what the prompt and the answer leave.
    "context_tokens": (int, 512, 2_000_000),
    "presence_penalty": (float, -2.0, 2.0),
    "frequency_penalty": (float, -2.0, 2.0),
    "seed": (int, 0, 2**31 - 1),
}


MASKED_SECRET = "********"  # noqa: S105 - the mask shown instead of a secret, not a secret


def _target_masked(target: dict) -> dict:
    masked = {}
    for key, value in target.items():
        if key == "api_key" and value:
            value = MASKED_SECRET
        elif key == "headers" and isinstance(value, dict):
            value = dict.fromkeys(value, MASKED_SECRET)  # Azure's api-key, Authorization: every value may be one
        masked[key] = value
    return masked


def route_masked(route: dict) -> dict:
    """The route with provider secrets hidden — API keys and every header value: no page or API
    response shows a stored secret."""
    return {**route, "targets": [_target_masked(target) for target in route.get("targets", [])]}


# What a stored secret is bound to: sent with the mask, it is restored only to the same upstream.
_UPSTREAM_FIELDS = ("kind", "base_url", "endpoints")


def _upstream_of(target: dict) -> tuple:
    def normal(value: Any) -> Any:
        if isinstance(value, str):
            return value.strip().rstrip("/")
        if isinstance(value, list):
            return tuple(normal(item) for item in value)
        return value

    return tuple(normal(target.get(name)) for name in _UPSTREAM_FIELDS)


def route_secrets_restored(route: Any, previous: dict | None) -> Any:
    """Put stored secrets (API key, header values) back where a client sent the mask, at the same
    target position and only if that target still points at the same upstream (kind, base URL,
    endpoints): otherwise the mask would send the stored key to a server of the caller's choosing.
    A mask with no secret stored behind it is refused: it must not become the secret."""
    if not isinstance(route, dict) or not isinstance(route.get("targets"), list):
        return route
    old_targets = (previous or {}).get("targets", [])
    for index, target in enumerate(route["targets"]):
        if not isinstance(target, dict):
            continue
        old = old_targets[index] if index < len(old_targets) else {}
        if not isinstance(old, dict) or _upstream_of(old) != _upstream_of(target):
            old = {}
        if target.get("api_key") == MASKED_SECRET:
            if not old.get("api_key"):
                raise ValidationFailed(
                    f"{MASKED_SECRET} stands for the API key stored for this target's kind, base URL and "
                    "endpoints; for a new or changed target, send the key itself.",
                    param=f"provider_route.targets[{index}].api_key",
                )
            target["api_key"] = old["api_key"]
        headers = target.get("headers")
        if isinstance(headers, dict):
            stored = old.get("headers")
            old_headers: dict = stored if isinstance(stored, dict) else {}
            for name, value in headers.items():
                if value == MASKED_SECRET:
                    if name not in old_headers:
                        raise ValidationFailed(
                            f"{MASKED_SECRET} stands for the header value stored for this target's kind, base "
                            "URL and endpoints; for a new or changed target, send the value itself.",
                            param=f"provider_route.targets[{index}].headers.{name}",
                        )
                    headers[name] = old_headers[name]
    return route


def validate_provider_route(route: Any) -> dict:
    """The provider registry's own validation, so that what is saved is what can be built; and,
    being saved, every URL's host looked up: one that resolves to an internal address is refused
    now rather than only when a turn connects (tenants.outbound)."""
    cleaned = validate_route_config(route, param_prefix="provider_route")
    for index, target in enumerate(cleaned["targets"]):
        urls = [("base_url", target["base_url"])] if "base_url" in target else []
        urls += [(f"endpoints.{number}", url) for number, url in enumerate(target.get("endpoints", []))]
        for field_name, url in urls:
            try:
                validate_outbound_url(url, resolve=True)
            except OutboundRefused as error:
                param = f"provider_route.targets.{index}.{field_name}"
                raise ValidationFailed(f"{param}: {error}", param=param) from None
    return cleaned


def validate_generation(generation: Any) -> dict:
    if not isinstance(generation, dict):
        raise ValidationFailed("generation must be an object.", param="generation")
    cleaned: dict[str, Any] = {}
    for key, value in generation.items():
        if key == "stop":
            if not (isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) and s for s in value)):
                raise ValidationFailed(
                    "generation.stop must be a list of up to 4 non-empty strings.", param="generation.stop"
                )
            cleaned[key] = value
            continue
        if key not in GENERATION_LIMITS:
            raise ValidationFailed(f"Unknown generation parameter {key!r}.", param=f"generation.{key}")
        kind, low, high = GENERATION_LIMITS[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise ValidationFailed(f"generation.{key} must be a number.", param=f"generation.{key}")
        if not low <= value <= high:
            raise ValidationFailed(f"generation.{key} must be between {low} and {high}.", param=f"generation.{key}")
        cleaned[key] = kind(value)
    return cleaned


def validate_origins(origins: list[str]) -> list[str]:
    """Stored as the widget compares them (chat.widget.origin_normalise)."""
    cleaned = []
    for origin in origins:
        normalised = origin_normalise(origin)
        if normalised is None:
            raise ValidationFailed(
                f"{origin!r} is not an origin like https://www.example.com.", param="allowed_origins"
            )
        cleaned.append(normalised)
    return sorted(set(cleaned))


def _new_public_id() -> str:
    return "bot_" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")


def _knowledge_bases(ids: list[int]) -> list[KnowledgeBase]:
    found = list(KnowledgeBase.objects.filter(pk__in=ids))
    missing = sorted(set(ids) - {kb.pk for kb in found})
    if missing:
        raise ValidationFailed(
            f"Unknown knowledge base id(s): {', '.join(map(str, missing))}.", param="knowledge_bases"
        )
    return found


@transaction.atomic
def bot_create(
    *,
    name: str,
    system_prompt: str = "",
    provider_route: dict | None = None,
    generation: dict | None = None,
    history_strategy: str = Bot.HistoryStrategy.WINDOW,
    history_window: int = 10,
    knowledge_bases: list[int] | None = None,
    allowed_origins: list[str] | None = None,
    allow_any_origin: bool = False,
    greeting: str = "",
    theme: dict | None = None,
    cache: dict | None = None,
    rate_limits: dict | None = None,
) -> Bot:
    if not name.strip():
        raise ValidationFailed("Bot name must not be empty.", param="name")
    bot = Bot.objects.create(
        name=name.strip(),
        public_id=_new_public_id(),
        system_prompt=system_prompt,
        provider_route=(
            validate_provider_route(route_secrets_restored(provider_route, None))
            if provider_route
            else default_provider_route()
        ),
        generation={**default_generation(), **validate_generation(generation or {})},
        history_strategy=history_strategy,
        history_window=history_window,
        allowed_origins=validate_origins(allowed_origins or []),
        allow_any_origin=allow_any_origin,
        greeting=greeting,
        **({"theme": theme} if theme else {}),
        cache=cache_settings_validate(cache or {}),
        rate_limits=validate_rate_limits(rate_limits or {}),
    )
    if knowledge_bases:
        bot.knowledge_bases.set(_knowledge_bases(knowledge_bases))
    public_bot_register(tenant=connection.tenant, public_id=bot.public_id)
    return bot


@transaction.atomic
def bot_update(*, bot: Bot, **changes: Any) -> Bot:
    """Apply a partial update; bumps ``version`` if anything that shapes answers changed."""
    answer_changed = False
    if "provider_route" in changes:
        # A route read back from the API or the site carries masks where keys are stored.
        changes["provider_route"] = validate_provider_route(
            route_secrets_restored(changes["provider_route"], bot.provider_route)
        )
    if "generation" in changes:
        changes["generation"] = {**default_generation(), **validate_generation(changes["generation"])}
    if "allowed_origins" in changes:
        changes["allowed_origins"] = validate_origins(changes["allowed_origins"])
    if "cache" in changes:
        changes["cache"] = cache_settings_validate(changes["cache"])
    if "rate_limits" in changes:
        changes["rate_limits"] = validate_rate_limits(changes["rate_limits"])
    if "name" in changes and not str(changes["name"]).strip():
        raise ValidationFailed("Bot name must not be empty.", param="name")
    knowledge_base_ids = changes.pop("knowledge_bases", None)
    for field, value in changes.items():
        if getattr(bot, field) != value:
            answer_changed |= field in ANSWER_FIELDS
            setattr(bot, field, value)
    if knowledge_base_ids is not None:
        new = _knowledge_bases(knowledge_base_ids)
        if {kb.pk for kb in new} != set(bot.knowledge_bases.values_list("pk", flat=True)):
            bot.knowledge_bases.set(new)
            answer_changed = True
    bot.save()
    if answer_changed:
        Bot.objects.filter(pk=bot.pk).update(version=F("version") + 1)
        config_changed()  # an update() sends no signal (chat.snapshots)
        bot.refresh_from_db(fields=["version"])
    return bot


@transaction.atomic
def bot_delete(*, bot: Bot) -> None:
    public_id = bot.public_id
    bot.delete()
    PublicBot.objects.filter(public_id=public_id, tenant_id=connection.tenant.pk).delete()
    public_bot_cache_invalidate(public_id)


def conversation_create(*, bot: Bot, end_user_kind: str, end_user_id: str, title: str = "") -> Conversation:
    return Conversation.objects.create(
        bot=bot, end_user_kind=end_user_kind, end_user_id=end_user_id[:200], title=title[:200]
    )


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation with its messages, its hot-store entries and any still queued."""
    from chat.memory.hot_store import hot_forget

    conversation_id = str(conversation.pk)
    conversation.delete()
    # Messages still in the write stream are dropped by the flusher (their conversation is gone).
    transaction.on_commit(lambda: hot_forget(schema_name=connection.schema_name, conversation_ids=[conversation_id]))


_PURGE_MESSAGES_SQL = "DELETE FROM {message} WHERE conversation_id = ANY(%s::uuid[])"
_PURGE_CONVERSATIONS_SQL = "DELETE FROM {conversation} WHERE id = ANY(%s::uuid[])"


def conversations_purge_expired(*, retention_days: int, now=None, batch_size: int | None = None) -> int:
    """Delete the active schema's conversations idle for longer than ``retention_days``, in short
    transactions of ``batch_size`` conversations (no long locks, no ORM cascade loading rows), and
    drop their hot-store entries. Returns conversations deleted."""
    from django.conf import settings

    from chat.memory.hot_store import hot_forget

    batch_size = batch_size or settings.PARLEY_RETENTION_PURGE_BATCH
    cutoff = (now or timezone.now()) - timedelta(days=retention_days)
    schema_name = connection.schema_name
    message_table, conversation_table = Message._meta.db_table, Conversation._meta.db_table
    deleted = 0
    while True:
        with transaction.atomic():
            ids = list(
                Conversation.objects.annotate(active_at=Coalesce("last_message_at", "created_at"))
                .filter(active_at__lt=cutoff)
                .order_by()
                .values_list("pk", flat=True)[:batch_size]
            )
            if not ids:
                return deleted
            with connection.cursor() as cursor:
                cursor.execute(_PURGE_MESSAGES_SQL.format(message=message_table), [ids])
                cursor.execute(_PURGE_CONVERSATIONS_SQL.format(conversation=conversation_table), [ids])
        hot_forget(schema_name=schema_name, conversation_ids=[str(pk) for pk in ids])
        deleted += len(ids)
