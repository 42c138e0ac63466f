"""WebSocket routes of the chat app (Channels), mounted by config.routing."""

from django.urls import path

from chat.consumers import BotConsumer

websocket_urlpatterns = [
    path("ws/bots/<str:public_id>/", BotConsumer.as_asgi()),
]
