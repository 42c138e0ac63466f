"""Reads of the chat app. Each fetch-and-check raises NotFound for what the caller may not see,
so that another tenant's (or another end user's) objects are indistinguishable from missing ones."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.db.models import QuerySet

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
    from django.db import connection

    from chat.memory import hot_store
    from chat.memory.records import message_of

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
        message = Message.objects.filter(conversation=conversation, pk=message.pk).first()
        if message is None:
            raise NotFound("No such message.", param="id")
    return message
