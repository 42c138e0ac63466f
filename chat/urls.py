from django.urls import path

from chat import apis
from chat.transports.openai_api import ChatCompletionsApi

urlpatterns = [
    path("v1/models", apis.ModelListApi.as_view(), name="openai-models"),
    path("v1/chat/completions", ChatCompletionsApi.as_view(), name="openai-chat-completions"),
    path("api/v1/bots/", apis.BotListCreateApi.as_view(), name="bots"),
    path("api/v1/bots/<str:bot_id>/", apis.BotDetailApi.as_view(), name="bot-detail"),
    path("api/v1/bots/<str:bot_id>/conversations/", apis.ConversationListCreateApi.as_view(), name="conversations"),
    path(
        "api/v1/conversations/<str:conversation_id>/", apis.ConversationDetailApi.as_view(), name="conversation-detail"
    ),
    path("api/v1/conversations/<str:conversation_id>/messages/", apis.MessageListApi.as_view(), name="messages"),
    path(
        "api/v1/generations/<str:generation_id>/events/", apis.GenerationEventsApi.as_view(), name="generation-events"
    ),
    path(
        "api/v1/generations/<str:generation_id>/cancel/", apis.GenerationCancelApi.as_view(), name="generation-cancel"
    ),
]

# The embeddable widget (chat/transports/widget_api.py): on any host, the tenant named by the bot id.
from chat.transports import widget_api as widget_apis  # noqa: E402

WIDGET = "api/v1/widget/bots/<str:public_id>/"
urlpatterns += [
    path(f"{WIDGET}session/", widget_apis.SessionApi.as_view(), name="widget-session"),
    path(f"{WIDGET}conversations/", widget_apis.ConversationListCreateApi.as_view(), name="widget-conversations"),
    path(
        f"{WIDGET}conversations/<str:conversation_id>/messages/",
        widget_apis.MessageListApi.as_view(),
        name="widget-messages",
    ),
    path(
        f"{WIDGET}conversations/<str:conversation_id>/messages/<str:message_id>/feedback/",
        widget_apis.FeedbackApi.as_view(),
        name="widget-feedback",
    ),
    path(
        f"{WIDGET}generations/<str:generation_id>/events/",
        widget_apis.GenerationEventsApi.as_view(),
        name="widget-generation-events",
    ),
    path(
        f"{WIDGET}generations/<str:generation_id>/cancel/",
        widget_apis.GenerationCancelApi.as_view(),
        name="widget-generation-cancel",
    ),
]
