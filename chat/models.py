"""Tenant-schema chat models: bots, conversations and their messages.

Messages are rows ordered by creation, never a growing JSON blob on the conversation: a turn
appends two rows, and reading the recent window is an indexed range scan.
"""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models.functions import Coalesce
from django.utils import timezone

DEFAULT_PROVIDER_ROUTE = {"targets": [{"kind": "local"}]}
DEFAULT_GENERATION = {"temperature": 0.2, "top_p": 1.0, "max_tokens": 512}


def default_provider_route() -> dict:
    return {"targets": [dict(target) for target in DEFAULT_PROVIDER_ROUTE["targets"]]}


def default_generation() -> dict:
    return dict(DEFAULT_GENERATION)


def default_theme() -> dict:
    return {"primary_color": "#3457d5", "text_color": "#ffffff", "position": "right"}


class Bot(models.Model):
    class HistoryStrategy(models.TextChoices):
        FULL = "full", "Full replay"
        WINDOW = "window", "Sliding window"
        SUMMARY = "summary", "Running summary"

    name = models.CharField(max_length=200)
    public_id = models.CharField(max_length=40, unique=True)
    system_prompt = models.TextField(blank=True, default="")
    provider_route = models.JSONField(default=default_provider_route)
    generation = models.JSONField(default=default_generation)
    history_strategy = models.CharField(max_length=20, choices=HistoryStrategy.choices, default=HistoryStrategy.WINDOW)
    history_window = models.PositiveIntegerField(default=10)
    knowledge_bases = models.ManyToManyField("knowledge.KnowledgeBase", blank=True, related_name="bots")
    allowed_origins = ArrayField(models.CharField(max_length=255), default=list, blank=True)
    allow_any_origin = models.BooleanField(default=False)
    greeting = models.CharField(max_length=500, blank=True, default="")
    theme = models.JSONField(default=default_theme)
    # Response cache settings (chat.cache.cache_settings_validate): enabled, semantic, threshold, TTL, FAQ mode.
    cache = models.JSONField(default=dict, blank=True)
    # Per-bot and per-end-user rate limits (chat.admission.validate_rate_limits); the plan sets the rest.
    rate_limits = models.JSONField(default=dict, blank=True)
    # HMAC key for identity verification: the customer's backend signs its user's id with it, and the
    # widget's conversation then belongs to that verified user. Empty: identity verification is off.
    identity_secret = models.CharField(max_length=100, blank=True, default="")
    # Bumped whenever anything that shapes answers changes; response caches key on it.
    version = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name", "id"]

    def __str__(self) -> str:
        return self.name


class Conversation(models.Model):
    class EndUserKind(models.TextChoices):
        USER = "user", "Signed-in user"
        API = "api", "API caller"
        VISITOR = "visitor", "Widget visitor"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    bot = models.ForeignKey(Bot, on_delete=models.CASCADE, related_name="conversations")
    end_user_kind = models.CharField(max_length=20, choices=EndUserKind.choices)
    end_user_id = models.CharField(max_length=200)
    title = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    last_message_at = models.DateTimeField(null=True, blank=True)
    # The summary history strategy: older turns compressed by chat.memory.summaries, covering the
    # messages up to ``summary_until_ts`` (microseconds since the epoch, chat.memory.records).
    summary = models.TextField(blank=True, default="")
    summary_until_ts = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["bot", "end_user_kind", "end_user_id", "-created_at"], name="conv_bot_user"),
            # The retention purge's scan: conversations by last activity.
            models.Index(Coalesce("last_message_at", "created_at"), name="conv_active_at"),
        ]

    def __str__(self) -> str:
        return f"{self.bot_id}:{self.end_user_kind}:{self.end_user_id}"


class Message(models.Model):
    class Role(models.TextChoices):
        USER = "user", "User"
        ASSISTANT = "assistant", "Assistant"
        SYSTEM = "system", "System"

    class Feedback(models.TextChoices):
        UP = "up", "Helpful"
        DOWN = "down", "Not helpful"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=20, choices=Role.choices)
    content = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)
    generation_id = models.UUIDField(null=True, blank=True)
    # Assistant messages only:
    tokens_in = models.PositiveIntegerField(null=True, blank=True)
    tokens_out = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    total_ms = models.FloatField(null=True, blank=True)
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    is_cached = models.BooleanField(default=False)
    cache_layer = models.CharField(max_length=10, blank=True, default="")  # "exact" | "semantic" when cached
    citations = models.JSONField(default=list, blank=True)
    finish_reason = models.CharField(max_length=40, blank=True, default="")
    # The end user's verdict on an assistant answer (widget thumbs, API).
    feedback = models.CharField(max_length=10, choices=Feedback.choices, blank=True, default="")
    feedback_comment = models.CharField(max_length=2000, blank=True, default="")
    feedback_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"], name="message_conv_created")]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:40]}"
