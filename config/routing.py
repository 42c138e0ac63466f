"""WebSocket routes (Channels). Each app contributes its own list."""

from chat.websocket_urls import websocket_urlpatterns as chat_websocket_urlpatterns

websocket_urlpatterns: list = [*chat_websocket_urlpatterns]
