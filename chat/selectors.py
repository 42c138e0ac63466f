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


def message_list(*, conversation: Conversation, limit: int = 100) -> list[Message]:
    newest = Message.objects.filter(conversation=conversation).order_by("-created_at", "-id")[:limit]
    return list(reversed(newest))


def message_get(*, conversation: Conversation, message_id: str) -> Message:
    message = Message.objects.filter(conversation=conversation, pk=message_id).first()
    if message is None:
        raise NotFound("No such message.", param="id")
    return message
