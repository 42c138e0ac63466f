"""Reads of the chat app. Each fetch-and-check raises NotFound for what the caller may not see,
so that another tenant's (or another end user's) objects are indistinguishable from missing ones."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import Aggregate, Count, Exists, FloatField, OuterRef, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate

from chat.models import Bot, Conversation, Message
from tenants.errors import NotFound


@dataclass(frozen=True)
class EndUser:
    """Who a conversation belongs to. ``sees_all`` callers (admins) see every end user's."""

    kind: str
    id: str
    sees_all: bool = False


def bot_list() -> QuerySet[Bot]:
    return Bot.objects.all()


def bot_get(*, public_id: str) -> Bot:
    bot = Bot.objects.filter(public_id=public_id).first()
    if bot is None:
        raise NotFound(f"No bot with id {public_id!r}.", param="id")
    return bot


def _visible_conversations(end_user: EndUser) -> QuerySet[Conversation]:
    conversations = Conversation.objects.select_related("bot")
    if end_user.sees_all:
        return conversations
    return conversations.filter(end_user_kind=end_user.kind, end_user_id=end_user.id)


def conversation_list(*, bot: Bot, end_user: EndUser, limit: int = 50) -> list[Conversation]:
    return list(_visible_conversations(end_user).filter(bot=bot).order_by("-created_at")[:limit])


def conversation_get(*, conversation_id: str, end_user: EndUser) -> Conversation:
    try:
        key = uuid.UUID(str(conversation_id))
    except ValueError:
        key = None
    conversation = _visible_conversations(end_user).filter(pk=key).first() if key else None
    if conversation is None:
        raise NotFound(f"No conversation with id {conversation_id!r}.", param="id")
    return conversation


def message_records_newest(*, conversation_id: str, limit: int) -> list[dict]:
    """The newest ``limit`` stored messages of a conversation as records, oldest first (what the
    hot store is filled with on a miss)."""
    from chat.memory.records import record_of

    newest = Message.objects.filter(conversation_id=conversation_id).order_by("-created_at", "-id")[:limit]
    return [record_of(message) for message in reversed(newest)]


def _recent_unstored(conversation: Conversation) -> list[Message]:
    """Messages of the conversation that the hot store holds (batched persistence: perhaps not in
    PostgreSQL yet). Read-your-writes for the APIs."""
    from chat.memory import hot_store
    from chat.memory.records import message_of
    from tenants.connection import connection

    recent = hot_store.hot_recent(
        schema_name=connection.schema_name,
        conversation_id=str(conversation.pk),
        limit=hot_store.capacity(),
        load_newest=lambda count: message_records_newest(conversation_id=str(conversation.pk), limit=count),
    )
    return [message_of(record) for record in recent.records]


def message_list(*, conversation: Conversation, limit: int = 100) -> list[Message]:
    """The newest ``limit`` messages, oldest first: PostgreSQL's rows and the hot store's newer ones."""
    newest = list(Message.objects.filter(conversation=conversation).order_by("-created_at", "-id")[:limit])
    stored = {message.pk for message in newest}
    merged = newest + [message for message in _recent_unstored(conversation) if message.pk not in stored]
    merged.sort(key=lambda message: (message.created_at, str(message.pk)))
    return merged[-limit:]


def message_get(*, conversation: Conversation, message_id: str) -> Message:
    try:
        key = uuid.UUID(str(message_id))
    except ValueError:
        raise NotFound("No such message.", param="id") from None
    message = Message.objects.filter(conversation=conversation, pk=key).first()
    if message is None:
        message = next((item for item in _recent_unstored(conversation) if item.pk == key), None)
    if message is None:
        raise NotFound("No such message.", param="id")
    return message


def message_get_stored(*, conversation: Conversation, message_id: str) -> Message:
    """A message row to update (feedback): a message still in the write stream is flushed first."""
    message = message_get(conversation=conversation, message_id=message_id)
    if message._state.adding:  # from the hot store: not written yet
        from chat.memory.persistence import messages_flush

        messages_flush()
        stored = Message.objects.filter(conversation=conversation, pk=message.pk).first()
        if stored is None:
            raise NotFound("No such message.", param="id")
        return stored
    return message


# --- the admin site: dashboard and conversation browsing ---------------------------------------


class Percentile(Aggregate):
    """PostgreSQL's ``percentile_cont(p) WITHIN GROUP (ORDER BY expr)``; ``p`` is a code constant."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, *, fraction: float, **extra) -> None:
        super().__init__(expression, fraction=float(fraction), **extra)


_ANSWER = Q(role=Message.Role.ASSISTANT)


def _message_stats() -> dict:
    return {
        "messages": Count("id"),
        "answers": Count("id", filter=_ANSWER),
        "tokens_in": Coalesce(Sum("tokens_in", filter=_ANSWER), 0),
        "tokens_out": Coalesce(Sum("tokens_out", filter=_ANSWER), 0),
        "cached": Count("id", filter=_ANSWER & Q(is_cached=True)),
        "errors": Count("id", filter=_ANSWER & Q(finish_reason="error")),
        "ttft_p50": Percentile("ttft_ms", fraction=0.5, filter=_ANSWER & Q(is_cached=False)),
        "ttft_p95": Percentile("ttft_ms", fraction=0.95, filter=_ANSWER & Q(is_cached=False)),
    }


@dataclass(frozen=True)
class DashboardStats:
    days: list[dict]  # one per day of the range, oldest first, every counter present (zeros on quiet days)
    totals: dict


def dashboard_stats(*, date_from: date, date_to: date) -> DashboardStats:
    """Per-day conversations, messages, tokens, cache hits, errors and TTFT percentiles over
    ``[date_from, date_to]`` (UTC days), and the same over the whole range.

    Three aggregate queries whatever the range or the traffic; percentiles are computed by
    PostgreSQL (time to first token of answers the model produced, cached answers left out).
    """
    start = datetime.combine(date_from, time.min, tzinfo=UTC)
    end = datetime.combine(date_to + timedelta(days=1), time.min, tzinfo=UTC)
    conversations = dict(
        Conversation.objects.filter(created_at__gte=start, created_at__lt=end)
        .annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(count=Count("id"))
        .order_by()
        .values_list("day", "count")
    )
    messages = Message.objects.filter(created_at__gte=start, created_at__lt=end)
    per_day = {
        row["day"]: row
        for row in messages.annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("day")
        .annotate(**_message_stats())
        .order_by()
    }
    empty = {"messages": 0, "answers": 0, "tokens_in": 0, "tokens_out": 0, "cached": 0, "errors": 0}
    days = []
    for offset in range((date_to - date_from).days + 1):
        day = date_from + timedelta(days=offset)
        row: Mapping[str, Any] = per_day.get(day, {})
        days.append(
            {
                "day": day,
                "conversations": conversations.get(day, 0),
                **{name: row.get(name, value) for name, value in empty.items()},
                "ttft_p50": row.get("ttft_p50"),
                "ttft_p95": row.get("ttft_p95"),
            }
        )
    totals = messages.aggregate(**_message_stats())
    totals["conversations"] = sum(conversations.values())
    totals["cache_hit_rate"] = totals["cached"] / totals["answers"] if totals["answers"] else None
    return DashboardStats(days=days, totals=totals)


@dataclass(frozen=True)
class ConversationFilters:
    bot_id: int | None = None
    date_from: date | None = None
    date_to: date | None = None
    end_user_kind: str = ""
    has_negative_feedback: bool = False
    is_cached: bool = False


def conversation_search(*, filters: ConversationFilters) -> QuerySet[Conversation]:
    """Every end user's conversations (admins only), newest first, with their message counts."""
    conversations = Conversation.objects.select_related("bot")
    if filters.bot_id:
        conversations = conversations.filter(bot_id=filters.bot_id)
    if filters.date_from:
        conversations = conversations.filter(created_at__gte=datetime.combine(filters.date_from, time.min, UTC))
    if filters.date_to:
        end = datetime.combine(filters.date_to + timedelta(days=1), time.min, UTC)
        conversations = conversations.filter(created_at__lt=end)
    if filters.end_user_kind:
        conversations = conversations.filter(end_user_kind=filters.end_user_kind)
    if filters.has_negative_feedback:
        conversations = conversations.filter(
            Exists(Message.objects.filter(conversation=OuterRef("pk"), feedback=Message.Feedback.DOWN))
        )
    if filters.is_cached:
        conversations = conversations.filter(
            Exists(Message.objects.filter(conversation=OuterRef("pk"), is_cached=True))
        )
    return conversations.annotate(message_count=Count("messages")).order_by("-created_at", "-id")


def conversation_get_for_admin(*, conversation_id: str) -> Conversation:
    return conversation_get(conversation_id=conversation_id, end_user=EndUser(kind="", id="", sees_all=True))
