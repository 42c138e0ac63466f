"""WebSocket routes (Channels). Each app contributes its own list."""

websocket_urlpatterns: list = []
