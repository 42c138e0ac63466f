"""WebSocket transport: ``/ws/bots/<public_id>/`` — the same events as SSE, plus cancel and
resume from the client.

Who may connect: a browser page whose Origin is on the bot's ``allowed_origins`` (or any origin
if the tenant allowed that), as an anonymous visitor identified by ``?visitor_id=``; or a server
client sending ``Authorization: Bearer <API key>`` with the ``chat`` scope.

Client → server frames (JSON):
    {"type": "message", "content": "...", "conversation_id": "<optional uuid>"}
    {"type": "cancel", "generation_id": "..."}
    {"type": "resume", "generation_id": "...", "last_event_id": "<id of the last event received>"}
Server → client frames: {"type": <event type>, "id": <event id>, "data": {...}}, and
{"type": "error", "data": {"message", "type", "code"}} for a refused frame (the socket stays open).
"""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import selectors, turns
from chat.gateway import caller_for
from chat.metrics import ACTIVE_STREAMS
from chat.models import Bot, Conversation
from chat.selectors import EndUser
from chat.streams import parse_last_event_id
from chat.transports.hub import follow
from chat.widget import VISITOR_ID, origin_allowed, visitor_end_user
from tenants.channels import tenant_database_sync_to_async
from tenants.errors import AuthenticationFailed, NotFound, ParleyError, ValidationFailed

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class BotConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.relays: dict[str, asyncio.Task] = {}
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self.scope["headers"]}
        public_id = self.scope["url_route"]["kwargs"]["public_id"]
        self.bot = await self._bot(public_id)
        if self.bot is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        authorization = headers.get("authorization", "")
        try:
            if authorization.lower().startswith("bearer "):
                self.end_user = await self._api_key_end_user(authorization[7:].strip())
            else:
                self.end_user = self._visitor(headers.get("origin"))
        except ParleyError:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.accept()
        ACTIVE_STREAMS.labels("websocket").inc()
        self.counted = True

    def _visitor(self, origin: str | None) -> EndUser:
        if not origin_allowed(self.bot, origin):
            raise AuthenticationFailed("This page's origin is not allowed to use this bot.")
        query = parse_qs(self.scope.get("query_string", b"").decode())
        visitor_id = (query.get("visitor_id") or [""])[0]
        if not VISITOR_ID.match(visitor_id):
            raise ValidationFailed("visitor_id must be 8-64 letters, digits, '-' or '_'.")
        return visitor_end_user(visitor_id)

    async def disconnect(self, code: int) -> None:
        for task in getattr(self, "relays", {}).values():
            task.cancel()
        if getattr(self, "counted", False):
            ACTIVE_STREAMS.labels("websocket").dec()

    async def receive_json(self, content, **kwargs) -> None:
        handlers = {"message": self._on_message, "cancel": self._on_cancel, "resume": self._on_resume}
        handler = handlers.get(content.get("type") if isinstance(content, dict) else None)
        try:
            if handler is None:
                raise ValidationFailed("type must be one of message, cancel, resume.", param="type")
            await handler(content)
        except ParleyError as error:
            data = {"message": error.message, "type": error.error_type, "code": error.code}
            if getattr(error, "retry_after", None) is not None:
                data["retry_after"] = error.retry_after  # a refused turn (rate limit): when to try again
            await self.send_json({"type": "error", "data": data})

    async def _on_message(self, content: dict) -> None:
        started = await self._start_turn(content.get("conversation_id"), content.get("content"))
        self._relay(started.generation_id, started.stream_key, "0-0")

    async def _on_cancel(self, content: dict) -> None:
        await self._cancel(str(content.get("generation_id", "")))

    async def _on_resume(self, content: dict) -> None:
        generation_id = str(content.get("generation_id", ""))
        stream_key = await self._stream_key(generation_id)
        self._relay(generation_id, stream_key, parse_last_event_id(content.get("last_event_id")))

    def _relay(self, generation_id: str, stream_key: str, after: str) -> None:
        previous = self.relays.pop(generation_id, None)
        if previous is not None:
            previous.cancel()
        self.relays[generation_id] = asyncio.create_task(self._forward(stream_key, after))

    async def _forward(self, stream_key: str, after: str) -> None:
        async for event in follow(stream_key, after=after, block_ms=15_000):
            if event is not None:
                await self.send_json({"type": event.type, "id": event.id, "data": event.data})

    # --- database work, each call inside this connection's tenant ------------------------------

    @tenant_database_sync_to_async
    def _bot(self, public_id: str) -> Bot | None:
        return Bot.objects.filter(public_id=public_id).first()

    @tenant_database_sync_to_async
    def _api_key_end_user(self, raw_key: str) -> EndUser:
        from tenants.authentication import api_key_verify

        client = self.scope.get("client") or ("", 0)
        _user, context = api_key_verify(raw_key, tenant=self.scope["tenant"], client_ip=client[0] or "")
        if "chat" not in context.scopes and "admin" not in context.scopes:
            raise AuthenticationFailed("This API key lacks the 'chat' scope.")
        self.api_key_id = context.api_key_id
        return EndUser(kind=Conversation.EndUserKind.API, id=f"key:{context.api_key_id}")

    @tenant_database_sync_to_async
    def _start_turn(self, conversation_id: str | None, content) -> turns.StartedTurn:
        caller = caller_for(
            tenant=self.scope["tenant"],
            bot=self.bot,
            api_key_id=getattr(self, "api_key_id", None),
            end_user=self.end_user,
        )
        if conversation_id:
            conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=self.end_user)
            if conversation.bot_id != self.bot.pk:
                raise NotFound("No such conversation.", param="conversation_id")
        else:
            # Saved by turn_start once the gateway admits the turn: a refused turn leaves no new
            # conversation behind, and nothing is queued before the row is committed.
            conversation = Conversation(
                bot=self.bot, end_user_kind=self.end_user.kind, end_user_id=self.end_user.id[:200]
            )
        return turns.turn_start(conversation=conversation, content=content, caller=caller)

    @tenant_database_sync_to_async
    def _stream_key(self, generation_id: str) -> str:
        return turns.generation_get_for(generation_id=generation_id, end_user=self.end_user)

    @tenant_database_sync_to_async
    def _cancel(self, generation_id: str) -> None:
        turns.generation_cancel(generation_id=generation_id, end_user=self.end_user)
