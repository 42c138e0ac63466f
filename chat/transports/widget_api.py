"""The embeddable widget's endpoints: ``/api/v1/widget/bots/<public_id>/…`` on any host.

The tenant comes from the bot id in the path (tenants.middleware). Every request is checked, in
this order: the bot exists → the page's ``Origin`` may use it (403 ``origin_not_allowed``) → the
signed visitor token names this bot and origin (401) → the operation. Only ``session`` (the token
exchange) goes without a token.

CORS: preflights are granted to the bot's allowed origins only, with the request's origin echoed
(never ``*``; no cookies are involved: the token travels in ``Authorization``). Actual responses
echo the origin too, so that a refused page can read *why* it was refused: the session exchange
is a CORS "simple request" (its JSON body may be sent as ``text/plain``), which needs no preflight,
and its 403 carries nothing but the refusal.
"""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.conf import settings
from django.utils.cache import patch_vary_headers
from django_tenants.utils import get_public_schema_name
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.response import Response

from chat import selectors, services, turns, widget
from chat.apis import EventStreamNegotiationMixin
from chat.callers import caller_of_request
from chat.models import Bot, Conversation, Message
from chat.streams import parse_last_event_id
from chat.transports.sse import event_stream, sse_response
from chat.turn_core import ConversationRef, ConversationTurn, turn_begin
from chat.turn_input import MAX_MESSAGE_CHARS
from tenants.api_base import StrictSerializer, TenantAPIView
from tenants.authentication import AuthContext
from tenants.errors import NotFound
from tenants.json_input import BoundedJSONParser

ALLOWED_METHODS = "GET, POST, OPTIONS"
ALLOWED_HEADERS = "Authorization, Content-Type, Last-Event-ID"
EXPOSED_HEADERS = ", ".join(
    [
        "X-Parley-Generation-Id",
        "X-Parley-Cache",
        "Retry-After",
        *(f"x-ratelimit-{part}-{kind}" for kind in ("requests", "tokens") for part in ("limit", "remaining", "reset")),
    ]
)


class PlainTextJSONParser(BoundedJSONParser):
    """JSON sent as ``text/plain``: keeps the session exchange a CORS simple request."""

    media_type = "text/plain"


class WidgetVisitor:
    """The principal behind a visitor token: a browser on an allowed site, no account."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None
    id = None

    def __init__(self, visitor: widget.VisitorToken) -> None:
        self.visitor = visitor

    def __str__(self) -> str:
        return self.visitor.end_user.id


class WidgetTokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer pwt.…``: a visitor token from ``session``, checked against the
    view's bot and the request's origin (which the view resolved before authentication)."""

    def authenticate(self, request):
        header = get_authorization_header(request).split()
        if len(header) != 2 or header[0].lower() != b"bearer":
            return None
        view = request.parser_context["view"]
        visitor = widget.visitor_token_verify(
            header[1].decode("latin-1"), schema_name=request.tenant.schema_name, bot=view.bot, origin=view.origin
        )
        context = AuthContext(
            kind="widget", tenant=request.tenant, scopes=frozenset({"chat"}), extra={"visitor": visitor}
        )
        return WidgetVisitor(visitor), context

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="widget"'


class WidgetTokenScheme(OpenApiAuthenticationExtension):
    target_class = "chat.transports.widget_api.WidgetTokenAuthentication"
    name = "widgetToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "pwt.<signed>",
            "description": "A widget visitor token from POST /api/v1/widget/bots/{public_id}/session/.",
        }


def _widget_bot(request, public_id: str) -> Bot:
    if request.tenant.schema_name == get_public_schema_name():  # no tenant has this bot id
        raise NotFound(f"No bot with id {public_id!r}.", param="public_id")
    return selectors.bot_get(public_id=public_id)


def _client_ip(request) -> str:
    return widget.client_address(request.META)


class WidgetAPIView(TenantAPIView):
    """Bot and origin first, then the visitor token; CORS headers on the way out."""

    authentication_classes = [WidgetTokenAuthentication]
    required_scopes = {"GET": "chat", "POST": "chat"}
    bot: Bot
    origin: str = ""
    origin_allowed = False

    def initial(self, request, *args, **kwargs):
        self.bot = _widget_bot(request, kwargs["public_id"])
        self.origin = widget.origin_check(bot=self.bot, origin=request.headers.get("Origin"))
        self.origin_allowed = True
        super().initial(request, *args, **kwargs)

    def check_permissions(self, request):
        if request.method != "OPTIONS":  # a preflight carries no credentials
            super().check_permissions(request)

    @extend_schema(exclude=True)
    def options(self, request, *args, **kwargs):
        response = Response(status=status.HTTP_204_NO_CONTENT)
        response["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        response["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        response["Access-Control-Max-Age"] = str(settings.PARLEY_WIDGET_PREFLIGHT_MAX_AGE)
        return response

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        origin = request.headers.get("Origin")
        # A preflight only for allowed origins; any other response (a refusal, for a page that is
        # not allowed) readable by the page that asked.
        if widget.origin_normalise(origin) and (self.origin_allowed or request.method != "OPTIONS"):
            response["Access-Control-Allow-Origin"] = origin
            response["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        patch_vary_headers(response, ["Origin"])
        return response

    @property
    def visitor(self) -> widget.VisitorToken:
        context = self.request.auth
        assert isinstance(context, AuthContext)  # this view's authentication sets one (the visitor's token)
        return context.extra["visitor"]


# --- the token exchange -------------------------------------------------------------------------


class WidgetBotSerializer(serializers.Serializer):
    id = serializers.CharField()
    name = serializers.CharField()
    greeting = serializers.CharField()
    theme = serializers.DictField()


class SessionApi(WidgetAPIView):
    """Exchange the bot's public id for a short-lived visitor token (and the widget's settings)."""

    authentication_classes = []
    permission_classes = []
    parser_classes = [BoundedJSONParser, PlainTextJSONParser]

    class WidgetSessionInputSerializer(StrictSerializer):
        visitor_id = serializers.CharField(
            max_length=200, help_text="The browser's anonymous id (8-64 of [A-Za-z0-9_-])."
        )
        user_id = serializers.CharField(
            max_length=200, required=False, allow_blank=True, help_text="Identity verification: your user's id."
        )
        user_hash = serializers.CharField(
            max_length=200, required=False, allow_blank=True, help_text="hex HMAC-SHA256(identity secret, user_id)."
        )

    class WidgetSessionOutputSerializer(serializers.Serializer):
        token = serializers.CharField()
        expires_at = serializers.DateTimeField()
        visitor_id = serializers.CharField()
        is_verified = serializers.BooleanField()
        bot = WidgetBotSerializer()

    @extend_schema(request=WidgetSessionInputSerializer, responses={201: WidgetSessionOutputSerializer}, auth=[])
    def post(self, request, public_id: str):
        serializer = self.WidgetSessionInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        visitor_id = widget.visitor_id_validate(data["visitor_id"])
        schema_name = request.tenant.schema_name
        widget.session_admit(schema_name=schema_name, visitor_id=visitor_id, client_ip=_client_ip(request))
        user_id = widget.identity_verify(bot=self.bot, user_id=data.get("user_id"), user_hash=data.get("user_hash"))
        issued = widget.visitor_token_issue(
            schema_name=schema_name, bot=self.bot, origin=self.origin, visitor_id=visitor_id, verified_user_id=user_id
        )
        body = {
            "token": issued.token,
            "expires_at": issued.expires_at,
            "visitor_id": visitor_id,
            "is_verified": user_id is not None,
            "bot": {
                "id": self.bot.public_id,
                "name": self.bot.name,
                "greeting": self.bot.greeting,
                "theme": widget.widget_theme(self.bot),
            },
        }
        return Response(self.WidgetSessionOutputSerializer(body).data, status=status.HTTP_201_CREATED)


# --- conversations and messages -----------------------------------------------------------------


class WidgetConversationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Conversation
        fields = ["id", "title", "created_at", "last_message_at"]


class WidgetMessageSerializer(serializers.ModelSerializer):
    class Meta:
        model = Message
        fields = ["id", "role", "content", "created_at", "citations", "feedback", "finish_reason"]


class ConversationListCreateApi(WidgetAPIView):
    """The visitor's conversations with this bot (newest first); start a new one."""

    class WidgetConversationInputSerializer(StrictSerializer):
        title = serializers.CharField(max_length=200, allow_blank=True, required=False)

    @extend_schema(responses=WidgetConversationSerializer(many=True))
    def get(self, request, public_id: str):
        conversations = selectors.conversation_list(bot=self.bot, end_user=self.visitor.end_user, limit=20)
        return Response({"object": "list", "data": WidgetConversationSerializer(conversations, many=True).data})

    @extend_schema(request=WidgetConversationInputSerializer, responses={201: WidgetConversationSerializer})
    def post(self, request, public_id: str):
        serializer = self.WidgetConversationInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        end_user = self.visitor.end_user
        conversation = services.conversation_create(
            bot=self.bot,
            end_user_kind=end_user.kind,
            end_user_id=end_user.id,
            title=serializer.validated_data.get("title", ""),
        )
        return Response(WidgetConversationSerializer(conversation).data, status=status.HTTP_201_CREATED)


class MessageListApi(EventStreamNegotiationMixin, WidgetAPIView):
    """A conversation's history (so a returning visitor sees it); post a message, answered as
    Server-Sent Events (read with fetch: the widget POSTs and reads the stream)."""

    class WidgetMessageInputSerializer(StrictSerializer):
        """Documents the body; chat.turn_input.message_input_parse validates it (every transport)."""

        content = serializers.CharField(trim_whitespace=False, max_length=MAX_MESSAGE_CHARS)

    @extend_schema(responses=WidgetMessageSerializer(many=True))
    def get(self, request, public_id: str, conversation_id: str):
        conversation = widget.conversation_get_for_visitor(
            bot=self.bot, visitor=self.visitor, conversation_id=conversation_id
        )
        messages = selectors.message_list(conversation=conversation)
        return Response({"object": "list", "data": WidgetMessageSerializer(messages, many=True).data})

    @extend_schema(
        request=WidgetMessageInputSerializer,
        responses={(200, "text/event-stream"): OpenApiTypes.STR},
        description="Server-Sent Events: message.created, generation.started, token, citation, done, error.",
    )
    def post(self, request, public_id: str, conversation_id: str):
        conversation = widget.conversation_get_for_visitor(
            bot=self.bot, visitor=self.visitor, conversation_id=conversation_id
        )
        turn = ConversationTurn(
            bot_public_id=self.bot.public_id,
            body=request.data,
            conversation=ConversationRef.of(conversation),
            always_streams=True,
        )
        started = async_to_sync(turn_begin)(caller_of_request(request, client_ip=_client_ip(request)), turn)
        return sse_response(event_stream(started.stream_key), headers=turns.streamed_turn_headers(started))


class GenerationEventsApi(EventStreamNegotiationMixin, WidgetAPIView):
    """Follow the visitor's generation as SSE; with ``Last-Event-ID`` (header, or the
    ``last_event_id`` parameter) from after the last event received: the resume path."""

    @extend_schema(
        parameters=[OpenApiParameter("last_event_id", str, required=False)],
        responses={(200, "text/event-stream"): OpenApiTypes.STR},
    )
    def get(self, request, public_id: str, generation_id: str):
        stream_key = turns.generation_get_for(generation_id=generation_id, end_user=self.visitor.end_user)
        after = parse_last_event_id(request.headers.get("Last-Event-ID") or request.GET.get("last_event_id"))
        return sse_response(event_stream(stream_key, after=after), headers={"X-Parley-Generation-Id": generation_id})


class GenerationCancelApi(WidgetAPIView):
    @extend_schema(request=None, responses={202: OpenApiTypes.OBJECT})
    def post(self, request, public_id: str, generation_id: str):
        turns.generation_cancel(generation_id=generation_id, end_user=self.visitor.end_user)
        return Response({"id": generation_id, "status": "cancelling"}, status=status.HTTP_202_ACCEPTED)


class FeedbackApi(WidgetAPIView):
    """Thumbs up/down on an answer of the visitor's own conversation ("" withdraws it)."""

    class WidgetFeedbackInputSerializer(StrictSerializer):
        verdict = serializers.ChoiceField(choices=["up", "down", ""])
        comment = serializers.CharField(max_length=widget.FEEDBACK_COMMENT_CHARS, allow_blank=True, required=False)

    class WidgetFeedbackOutputSerializer(serializers.ModelSerializer):
        class Meta:
            model = Message
            fields = ["id", "feedback", "feedback_comment", "feedback_at"]

    @extend_schema(request=WidgetFeedbackInputSerializer, responses=WidgetFeedbackOutputSerializer)
    def post(self, request, public_id: str, conversation_id: str, message_id: str):
        conversation = widget.conversation_get_for_visitor(
            bot=self.bot, visitor=self.visitor, conversation_id=conversation_id
        )
        serializer = self.WidgetFeedbackInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        message = widget.message_feedback_set(
            conversation=conversation,
            message_id=message_id,
            verdict=serializer.validated_data["verdict"],
            comment=serializer.validated_data.get("comment", ""),
        )
        return Response(self.WidgetFeedbackOutputSerializer(message).data)
