"""REST endpoints for bots, conversations and messages (thin: translate, call, translate)."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response

from chat import selectors, services, turns
from chat.callers import caller_of_request, end_user_of_context
from chat.memory.records import message_of
from chat.models import Bot, Conversation, Message
from chat.selectors import EndUser
from chat.streams import parse_last_event_id
from chat.transports.sse import event_stream, sse_response, wants_event_stream
from chat.turn_core import ConversationRef, ConversationTurn, turn_begin
from chat.turn_input import MAX_MESSAGE_CHARS
from tenants.api_base import StrictSerializer, TenantAPIView


def end_user_of(request, external_user: str | None = None) -> EndUser:
    """The end user a request acts as (chat.callers holds the rule)."""
    return end_user_of_context(request.auth, request.user, external_user)


# --- bots ---------------------------------------------------------------------------------------


def bot_output_context(request) -> dict:
    scopes: frozenset[str] = getattr(request.auth, "scopes", frozenset())
    return {"is_admin": "admin" in scopes}


@extend_schema_field(OpenApiTypes.OBJECT)
class _MaskedRouteField(serializers.JSONField):
    def to_representation(self, value):
        return services.route_masked(value)


# Shown to admin-scope callers only: a route names the tenant's model servers (secrets masked), a
# system prompt is the bot's own configuration — neither is for chat-scope keys or members.
ADMIN_ONLY_BOT_FIELDS = ("system_prompt", "provider_route")


class BotOutputSerializer(serializers.ModelSerializer):
    """A bot; ``context["is_admin"]`` (``bot_output_context``) adds its route and system prompt."""

    id = serializers.CharField(source="public_id")
    # many=True, spelled out so that type checkers see the ManyRelatedField it builds
    knowledge_bases = serializers.PrimaryKeyRelatedField.many_init(read_only=True)
    system_prompt = serializers.CharField(required=False, help_text="Admin scope only.")
    provider_route = _MaskedRouteField(
        required=False,
        help_text=f"Admin scope only. Provider API keys and header values read as {services.MASKED_SECRET}; "
        "send them back unchanged to keep them (for the same kind, base URL and endpoints).",
    )

    def to_representation(self, instance):
        data = super().to_representation(instance)
        if not self.context.get("is_admin"):
            for name in ADMIN_ONLY_BOT_FIELDS:
                data.pop(name, None)
        return data

    class Meta:
        model = Bot
        fields = [
            "id",
            "name",
            "system_prompt",
            "provider_route",
            "generation",
            "history_strategy",
            "history_window",
            "knowledge_bases",
            "allowed_origins",
            "allow_any_origin",
            "greeting",
            "theme",
            "cache",
            "rate_limits",
            "version",
            "created_at",
            "updated_at",
        ]


class BotInputSerializer(StrictSerializer):
    name = serializers.CharField(max_length=200)
    system_prompt = serializers.CharField(allow_blank=True, max_length=20_000, required=False)
    provider_route = serializers.JSONField(required=False)
    generation = serializers.JSONField(required=False)
    history_strategy = serializers.ChoiceField(choices=Bot.HistoryStrategy.values, required=False)
    history_window = serializers.IntegerField(min_value=1, max_value=200, required=False)
    knowledge_bases = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False)
    allowed_origins = serializers.ListField(child=serializers.CharField(max_length=255), max_length=100, required=False)
    allow_any_origin = serializers.BooleanField(required=False)
    greeting = serializers.CharField(allow_blank=True, max_length=500, required=False)
    theme = serializers.JSONField(required=False)
    cache = serializers.JSONField(required=False, help_text="Response cache settings (enabled, semantic, …).")
    rate_limits = serializers.JSONField(required=False, help_text="Per-bot and per-end-user limits.")

    def validate_theme(self, value):
        if not isinstance(value, dict) or len(value) > 20:
            raise serializers.ValidationError("Must be an object of at most 20 settings.")
        return value


class BotListCreateApi(TenantAPIView):
    required_scopes = {"GET": "chat", "POST": "admin"}

    @extend_schema(responses=BotOutputSerializer(many=True))
    def get(self, request):
        bots = BotOutputSerializer(selectors.bot_list(), many=True, context=bot_output_context(request)).data
        return Response({"object": "list", "data": bots})

    @extend_schema(request=BotInputSerializer, responses={201: BotOutputSerializer})
    def post(self, request):
        serializer = BotInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        bot = services.bot_create(**serializer.validated_data)
        output = BotOutputSerializer(bot, context=bot_output_context(request)).data
        return Response(output, status=status.HTTP_201_CREATED)


class BotDetailApi(TenantAPIView):
    required_scopes = {"GET": "chat", "PATCH": "admin", "DELETE": "admin"}

    @extend_schema(responses=BotOutputSerializer)
    def get(self, request, bot_id: str):
        bot = selectors.bot_get(public_id=bot_id)
        return Response(BotOutputSerializer(bot, context=bot_output_context(request)).data)

    @extend_schema(request=BotInputSerializer(partial=True), responses=BotOutputSerializer)
    def patch(self, request, bot_id: str):
        bot = selectors.bot_get(public_id=bot_id)
        serializer = BotInputSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        bot = services.bot_update(bot=bot, **serializer.validated_data)
        return Response(BotOutputSerializer(bot, context=bot_output_context(request)).data)

    @extend_schema(responses={204: None})
    def delete(self, request, bot_id: str):
        services.bot_delete(bot=selectors.bot_get(public_id=bot_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- conversations ------------------------------------------------------------------------------


class ConversationOutputSerializer(serializers.ModelSerializer):
    bot = serializers.CharField(source="bot.public_id")

    class Meta:
        model = Conversation
        fields = ["id", "bot", "end_user_kind", "end_user_id", "title", "created_at", "last_message_at"]


class ConversationListCreateApi(TenantAPIView):
    required_scopes = {"GET": "chat", "POST": "chat"}

    class InputSerializer(StrictSerializer):
        title = serializers.CharField(max_length=200, allow_blank=True, required=False)
        user = serializers.CharField(
            max_length=100, required=False, help_text="Your own id for the end user (API callers)."
        )

    @extend_schema(
        parameters=[OpenApiParameter("user", str, description="API callers: only this end user's conversations.")],
        responses=ConversationOutputSerializer(many=True),
    )
    def get(self, request, bot_id: str):
        bot = selectors.bot_get(public_id=bot_id)
        conversations = selectors.conversation_list(bot=bot, end_user=end_user_of(request, request.GET.get("user")))
        return Response({"object": "list", "data": ConversationOutputSerializer(conversations, many=True).data})

    @extend_schema(request=InputSerializer, responses={201: ConversationOutputSerializer})
    def post(self, request, bot_id: str):
        bot = selectors.bot_get(public_id=bot_id)
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        end_user = end_user_of(request, serializer.validated_data.get("user"))
        conversation = services.conversation_create(
            bot=bot,
            end_user_kind=end_user.kind,
            end_user_id=end_user.id,
            title=serializer.validated_data.get("title", ""),
        )
        return Response(ConversationOutputSerializer(conversation).data, status=status.HTTP_201_CREATED)


class ConversationDetailApi(TenantAPIView):
    required_scopes = {"GET": "chat", "DELETE": "chat"}

    @extend_schema(responses=ConversationOutputSerializer)
    def get(self, request, conversation_id: str):
        conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=end_user_of(request))
        return Response(ConversationOutputSerializer(conversation).data)

    @extend_schema(responses={204: None})
    def delete(self, request, conversation_id: str):
        conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=end_user_of(request))
        services.conversation_delete(conversation=conversation)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = [
            "id",
            "role",
            "content",
            "created_at",
            "tokens_in",
            "tokens_out",
            "ttft_ms",
            "total_ms",
            "provider",
            "model",
            "is_cached",
            "cache_layer",
            "citations",
            "finish_reason",
        ]


class EventStreamNegotiationMixin:
    """SSE responses bypass DRF's renderers; errors before the stream starts are JSON, so the
    renderer is always JSON whatever the Accept header says."""

    def perform_content_negotiation(self, request, force=False):
        renderer = JSONRenderer()
        return renderer, renderer.media_type


class MessageListApi(EventStreamNegotiationMixin, TenantAPIView):
    """List a conversation's messages; post a message (answered as SSE with
    ``Accept: text/event-stream``, else as JSON once the answer is complete)."""

    required_scopes = {"GET": "chat", "POST": "chat"}

    class InputSerializer(StrictSerializer):
        """Documents the body; chat.turn_input.message_input_parse validates it (every transport)."""

        content = serializers.CharField(trim_whitespace=False, max_length=MAX_MESSAGE_CHARS)
        stream = serializers.BooleanField(required=False, default=False)

    @extend_schema(responses=MessageOutputSerializer(many=True))
    def get(self, request, conversation_id: str):
        conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=end_user_of(request))
        messages = selectors.message_list(conversation=conversation)
        return Response({"object": "list", "data": MessageOutputSerializer(messages, many=True).data})

    class TurnOutputSerializer(serializers.Serializer):
        generation_id = serializers.CharField()
        user_message = MessageOutputSerializer()
        message = MessageOutputSerializer(help_text="The answer.")

    @extend_schema(
        request=InputSerializer,
        responses={
            200: TurnOutputSerializer,
            (200, "text/event-stream"): OpenApiTypes.STR,
        },
        description=(
            'Ask in a conversation. With `Accept: text/event-stream` or `"stream": true` the answer is '
            "streamed as Server-Sent Events (message.created, generation.started, token, citation, done, "
            "error; resumable with GET /api/v1/generations/{id}/events/); otherwise the JSON below once "
            "the answer is complete. Headers: X-Parley-Generation-Id, X-Parley-Cache, rate limits."
        ),
    )
    def post(self, request, conversation_id: str):
        conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=end_user_of(request))
        turn = ConversationTurn(
            bot_public_id=conversation.bot.public_id,
            body=request.data,
            conversation=ConversationRef.of(conversation),
            accepts_event_stream=wants_event_stream(request),
        )
        started = async_to_sync(turn_begin)(caller_of_request(request), turn)
        if started.is_streamed:
            return sse_response(event_stream(started.stream_key), headers=turns.streamed_turn_headers(started))
        headers = {"X-Parley-Generation-Id": started.generation_id, **started.headers}
        outcome = turns.turn_wait(stream_key=started.stream_key)
        if outcome.error is not None:
            raise outcome.error
        assert outcome.message_id is not None  # a turn that ended without an error stored its answer
        answer = selectors.message_get(conversation=conversation, message_id=outcome.message_id)
        headers["X-Parley-Cache"] = answer.cache_layer or "miss"
        return Response(
            {
                "generation_id": started.generation_id,
                "user_message": MessageOutputSerializer(message_of(started.user_record)).data,
                "message": MessageOutputSerializer(answer).data,
            },
            headers=headers,
        )


class GenerationEventsApi(EventStreamNegotiationMixin, TenantAPIView):
    """Follow a generation as SSE from the start, or — with ``Last-Event-ID`` — from after an
    event already received: the resume path, served by any replica."""

    required_scopes = {"GET": "chat"}

    @extend_schema(
        responses={(200, "text/event-stream"): OpenApiTypes.STR},
        description="Server-Sent Events: message.created, token, citation, done, error; each with an id.",
    )
    def get(self, request, generation_id: str):
        stream_key = turns.generation_get_for(generation_id=generation_id, end_user=end_user_of(request))
        after = parse_last_event_id(request.headers.get("Last-Event-ID") or request.GET.get("last_event_id"))
        return sse_response(event_stream(stream_key, after=after), headers={"X-Parley-Generation-Id": generation_id})


class GenerationCancelApi(TenantAPIView):
    required_scopes = {"POST": "chat"}

    class OutputSerializer(serializers.Serializer):
        id = serializers.CharField()
        status = serializers.ChoiceField(choices=["cancelling"])

    @extend_schema(request=None, responses={202: OutputSerializer})
    def post(self, request, generation_id: str):
        turns.generation_cancel(generation_id=generation_id, end_user=end_user_of(request))
        return Response({"id": generation_id, "status": "cancelling"}, status=status.HTTP_202_ACCEPTED)


# --- OpenAI-compatible --------------------------------------------------------------------------


class ModelListApi(TenantAPIView):
    """``GET /v1/models`` in the OpenAI list shape: one model per bot of the tenant."""

    required_scopes = {"GET": "chat"}

    class OpenAIModelSerializer(serializers.Serializer):
        id = serializers.CharField(help_text="A bot's public id: the `model` of /v1/chat/completions.")
        object = serializers.ChoiceField(choices=["model"])
        created = serializers.IntegerField(help_text="Unix time.")
        owned_by = serializers.CharField(help_text="The tenant's slug.")

    @extend_schema(responses=OpenAIModelSerializer(many=True))
    def get(self, request):
        return Response(
            {
                "object": "list",
                "data": [
                    {
                        "id": bot.public_id,
                        "object": "model",
                        "created": int(bot.created_at.timestamp()),
                        "owned_by": request.tenant.slug,
                    }
                    for bot in selectors.bot_list()
                ],
            }
        )
