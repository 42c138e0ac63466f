"""WebSocket transport: ``/ws/bots/<public_id>/`` — the same events as SSE, plus cancel and
resume from the client.

Who may connect: a browser page whose Origin is on the bot's ``allowed_origins`` (or any origin
if the tenant allowed that) with the widget's signed visitor token (``?token=pwt.…``, from
``POST /api/v1/widget/bots/<public_id>/session/``); or a server client sending
``Authorization: Bearer <API key>``. Each message frame starts its turn through the one door
(chat.turn_core.turn_begin) with the caller resolved again — a revoked or expired key, an expired
visitor token or a suspended tenant stops an open socket's next turn — and visitors count against
the widget's per-address limits, as on the widget's REST path.

Client → server frames (JSON):
    {"type": "message", "content": "...", "conversation_id": "<optional uuid>"}
    {"type": "cancel", "generation_id": "..."}
    {"type": "resume", "generation_id": "...", "last_event_id": "<id of the last event received>"}
Server → client frames: {"type": <event type>, "id": <event id>, "data": {...}}, and
{"type": "error", "data": {"message", "type", "code", "param"}} for a refused frame (the socket
stays open).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from chat import selectors, turns
from chat.callers import TurnCaller, api_key_caller, caller_of_visitor
from chat.metrics import ACTIVE_STREAMS
from chat.models import Bot
from chat.selectors import EndUser
from chat.streams import parse_last_event_id
from chat.transports.hub import follow
from chat.turn_core import ConversationRef, ConversationTurn, turn_begin
from chat.widget import VisitorToken, origin_allowed, origin_normalise, visitor_token_verify
from tenants.channels import tenant_database_sync_to_async, tenant_of_scope
from tenants.errors import AuthenticationFailed, NotFound, ParleyError, TenantSuspended, ValidationFailed
from tenants.json_input import json_parse
from tenants.redis import get_loop_redis

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404


class BotConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.relays: dict[str, asyncio.Task] = {}
        self.started: dict[str, ConversationRef] = {}  # conversations this socket started into
        self.headers = {
            name.decode("latin-1").lower(): value.decode("latin-1") for name, value in self.scope["headers"]
        }
        self.client_ip = (self.scope.get("client") or ("", 0))[0] or ""
        public_id = self.scope["url_route"]["kwargs"]["public_id"]
        self.bot = await self._bot(public_id)
        if self.bot is None:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        authorization = self.headers.get("authorization", "")
        self.raw_key = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        self.visitor_token = (parse_qs(self.scope.get("query_string", b"").decode()).get("token") or [""])[0]
        try:
            caller = await self._caller()
        except ParleyError:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.end_user: EndUser = caller.end_user
        await self.accept()
        ACTIVE_STREAMS.labels("websocket").inc()
        self.counted = True

    async def _caller(self) -> TurnCaller:
        """Who asks, resolved again for every turn: an API key (as the edge resolves it), or a
        widget visitor (token signature and expiry, origin, tenant still active)."""
        redis = get_loop_redis()
        if self.raw_key is not None:
            return await api_key_caller(
                self.raw_key, host=self.headers.get("host", ""), client_ip=self.client_ip, redis=redis
            )
        tenant = await database_sync_to_async(tenant_of_scope)(self.scope)  # the resolution cache
        if tenant is None or tenant.pk != self.scope["tenant"].pk:
            raise AuthenticationFailed("This workspace is not available.")
        if not tenant.is_active:
            raise TenantSuspended(f"The workspace '{tenant.slug}' is suspended.")
        return caller_of_visitor(tenant=tenant, visitor=self._visitor(), client_ip=self.client_ip)

    def _visitor(self) -> VisitorToken:
        origin = self.headers.get("origin")
        if not origin_allowed(self.bot, origin):
            raise AuthenticationFailed("This page's origin is not allowed to use this bot.")
        if not self.visitor_token:
            raise AuthenticationFailed("A widget visitor token is required (?token=).", code="missing_credentials")
        return visitor_token_verify(
            self.visitor_token,
            schema_name=self.scope["tenant"].schema_name,
            bot=self.bot,
            origin=origin_normalise(origin) or "",
        )

    async def disconnect(self, code: int) -> None:
        for task in getattr(self, "relays", {}).values():
            task.cancel()
        if getattr(self, "counted", False):
            ACTIVE_STREAMS.labels("websocket").dec()

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        return json_parse(text_data)  # bounded nesting, storable text: as every transport reads JSON

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        try:
            if text_data is None:
                raise ValidationFailed("Frames must be JSON text.")
            content = await self.decode_json(text_data)
            handlers = {"message": self._on_message, "cancel": self._on_cancel, "resume": self._on_resume}
            message_type = content.get("type") if isinstance(content, dict) else None
            handler = handlers.get(message_type) if isinstance(message_type, str) else None
            if handler is None:
                raise ValidationFailed("type must be one of message, cancel, resume.", param="type")
            await handler(content)
        except ParleyError as error:
            data = {"message": error.message, "type": error.error_type, "code": error.code, "param": error.param}
            retry_after = getattr(error, "retry_after", None)  # a refused turn (rate limit): when to try again
            if retry_after is not None:
                data["retry_after"] = retry_after
            await self.send_json({"type": "error", "data": data})

    async def _on_message(self, content: dict) -> None:
        caller = await self._caller()
        conversation_id = content.get("conversation_id")
        conversation = None
        if conversation_id is not None:
            if not isinstance(conversation_id, str):
                raise ValidationFailed("conversation_id must be a string.", param="conversation_id")
            conversation = await self._conversation(conversation_id, caller.end_user)
        body = {key: value for key, value in content.items() if key not in ("type", "conversation_id")}
        turn = ConversationTurn(
            bot_public_id=self.bot.public_id, body=body, conversation=conversation, always_streams=True
        )
        started = await turn_begin(caller, turn)
        self.started[started.conversation_id] = started.conversation
        self._relay(started.generation_id, started.stream_key, "0-0")

    async def _conversation(self, conversation_id: str, end_user: EndUser) -> ConversationRef:
        """The stored conversation (its summary as it stands now), or one this socket started
        whose row the batch writer has not written yet (within a second or so)."""
        try:
            stored = await self._stored_conversation(conversation_id, end_user)
        except NotFound:
            started = self.started.get(conversation_id)
            if started is None:
                raise
            return started
        self.started.pop(conversation_id, None)  # stored now: PostgreSQL has it from here on
        return stored

    async def _on_cancel(self, content: dict) -> None:
        await self._cancel(str(content.get("generation_id", "")), (await self._caller()).end_user)

    async def _on_resume(self, content: dict) -> None:
        generation_id = str(content.get("generation_id", ""))
        stream_key = await self._stream_key(generation_id, (await self._caller()).end_user)
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
    def _stored_conversation(self, conversation_id: str, end_user: EndUser) -> ConversationRef:
        conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=end_user)
        if conversation.bot_id != self.bot.pk:
            raise NotFound("No such conversation.", param="conversation_id")
        return ConversationRef.of(conversation)

    @tenant_database_sync_to_async
    def _stream_key(self, generation_id: str, end_user: EndUser) -> str:
        return turns.generation_get_for(generation_id=generation_id, end_user=end_user)

    @tenant_database_sync_to_async
    def _cancel(self, generation_id: str, end_user: EndUser) -> None:
        turns.generation_cancel(generation_id=generation_id, end_user=end_user)
