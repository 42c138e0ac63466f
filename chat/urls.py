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
