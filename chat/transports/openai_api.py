"""``POST /v1/chat/completions``: the OpenAI chat API over Parley's bots.

``model`` names a bot by its public id; the bot's system prompt, knowledge and provider route
apply. The turn runs like any other (stored as a conversation of the API key's end user, metered,
streamed through the generation's Redis stream), and answers in OpenAI's shapes — chunks ending
in ``data: [DONE]`` when streaming, a ``chat.completion`` otherwise — so the official SDKs work
unchanged, errors included.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import orjson
from asgiref.sync import async_to_sync
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from chat import turns
from chat.callers import caller_of_request
from chat.streams import StreamEvent
from chat.transports.hub import follow
from chat.transports.sse import HEARTBEAT, sse_response
from chat.turn_core import ExchangeTurn, turn_begin
from chat.turn_input import MAX_MESSAGES, ROLES, ChatCompletionInput
from tenants.api_base import StrictSerializer, TenantAPIView


class ChatMessageSerializer(serializers.Serializer):
    """Documents one message of the request (validated by chat.turn_input, like the request)."""

    role = serializers.ChoiceField(choices=ROLES)
    content = serializers.JSONField(help_text="A string, or a list of text parts ({type: text, text}).")
    name = serializers.CharField(required=False, max_length=64)


class ChatCompletionInputSerializer(StrictSerializer):
    """Documents the request body in the OpenAPI schema; requests are validated by the input
    contract every transport shares (chat.turn_input.chat_completion_parse)."""

    model = serializers.CharField(min_length=1, max_length=100, help_text="A bot's public id (see /v1/models).")
    messages = ChatMessageSerializer(many=True, allow_empty=False, max_length=MAX_MESSAGES)  # type: ignore[call-arg]  # DRF's stub omits the list kwargs (max_length) that many=True passes on
    stream = serializers.BooleanField(required=False, default=False)
    stream_options = serializers.DictField(required=False)
    temperature = serializers.FloatField(required=False, allow_null=True)
    top_p = serializers.FloatField(required=False, allow_null=True)
    max_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = serializers.IntegerField(
        required=False, allow_null=True, min_value=1, help_text="Wins over max_tokens when both are given."
    )
    stop = serializers.JSONField(required=False, allow_null=True)
    seed = serializers.IntegerField(required=False, allow_null=True, min_value=0)
    presence_penalty = serializers.FloatField(required=False, allow_null=True)
    frequency_penalty = serializers.FloatField(required=False, allow_null=True)
    user = serializers.CharField(required=False, max_length=100)
    n = serializers.IntegerField(required=False, min_value=1, max_value=1)
    logprobs = serializers.BooleanField(required=False)


class ChatCompletionsApi(TenantAPIView):
    """The same endpoint as the ASGI edge (chat.transports.openai_edge) for credentials the edge
    leaves to Django (JWT, OAuth2, a session), and for every caller with the edge switched off."""

    required_scopes = {"POST": "chat"}

    @extend_schema(
        request=ChatCompletionInputSerializer,
        responses={200: OpenApiTypes.OBJECT, (200, "text/event-stream"): OpenApiTypes.STR},
        description="OpenAI's chat completions API; `model` is a bot's public id (see /v1/models).",
    )
    def post(self, request):
        started = async_to_sync(turn_begin)(caller_of_request(request), ExchangeTurn(body=request.data))
        parsed = started.input
        assert isinstance(parsed, ChatCompletionInput)
        completion_id = f"chatcmpl-{started.generation_id.replace('-', '')}"
        created = int(time.time())
        model = started.bot.public_id
        if parsed.is_streamed:
            body = completion_chunks(
                follow(started.stream_key, block_ms=15_000),
                completion_id=completion_id,
                created=created,
                model=model,
                include_usage=parsed.include_usage,
            )
            return sse_response(body, headers=turns.streamed_turn_headers(started))
        waited = turns.turn_wait(stream_key=started.stream_key)
        if waited.error is not None:
            raise waited.error
        # Built from the generation's events: no database round trip after the answer.
        done = waited.done or {}
        return Response(
            completion_body(
                completion_id=completion_id,
                created=created,
                model=model,
                version=started.bot.version,
                text=waited.text,
                done=done,
            ),
            headers={
                "X-Parley-Generation-Id": started.generation_id,
                "X-Parley-Cache": done.get("cache_layer") or "miss",
                **started.headers,
            },
        )


def completion_body(*, completion_id: str, created: int, model: str, version: int, text: str, done: dict) -> dict:
    """A ``chat.completion`` from the answer's text and its ``done`` event."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": f"parley-v{version}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "finish_reason": finish_reason_of(done.get("finish_reason", "")),
                "logprobs": None,
            }
        ],
        "usage": done.get("usage") or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def finish_reason_of(reason: str) -> str:
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def _chunk(completion_id: str, created: int, model: str, delta: dict, finish_reason: str | None) -> bytes:
    payload = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE_CHUNK = b"data: [DONE]\n\n"


class ChunkEncoder:
    """A generation's events as ``chat.completion.chunk`` server-sent events."""

    def __init__(self, *, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id, self.created, self.model = completion_id, created, model
        self.include_usage = include_usage

    def opening(self) -> bytes:
        return _chunk(self.completion_id, self.created, self.model, {"role": "assistant", "content": ""}, None)

    def encode(self, event: StreamEvent | None) -> bytes:
        """The chunk(s) of one event (``None``: a quiet interval); empty for events the API has no chunk for."""
        if event is None:
            return HEARTBEAT
        if event.type == "token":
            return _chunk(self.completion_id, self.created, self.model, {"content": event.data["text"]}, None)
        if event.type == "done":
            finish = finish_reason_of(event.data.get("finish_reason", ""))
            chunk = _chunk(self.completion_id, self.created, self.model, {}, finish)
            if self.include_usage and event.data.get("usage"):
                usage = {
                    "id": self.completion_id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [],
                    "usage": event.data["usage"],
                }
                chunk += b"data: " + orjson.dumps(usage) + b"\n\n"
            return chunk
        if event.type == "error":
            data = event.data
            return error_chunk(message=data["message"], error_type=data.get("type", "api_error"), code=data.get("code"))
        return b""


def error_chunk(*, message: str, error_type: str, code: str | None) -> bytes:
    """An error as a stream's chunk: the SDKs raise an APIError for a chunk that carries "error"."""
    error = {"error": {"message": message, "type": error_type, "code": code}}
    return b"data: " + orjson.dumps(error) + b"\n\n"


async def completion_chunks(
    events: AsyncIterator[StreamEvent | None], *, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    """A generation's events (``None``: a quiet interval) as OpenAI chunks, ending with ``data: [DONE]``."""
    encoder = ChunkEncoder(completion_id=completion_id, created=created, model=model, include_usage=include_usage)
    yield encoder.opening()
    async for event in events:
        chunk = encoder.encode(event)
        if chunk:
            yield chunk
    yield DONE_CHUNK
