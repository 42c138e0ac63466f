"""ASGI entry point: HTTP → the OpenAI edge, then Django (views, DRF, SSE); WebSocket → Channels."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.transports.openai_edge import OpenAIEdge  # noqa: E402
from config.routing import websocket_urlpatterns  # noqa: E402
from tenants.channels import TenantWebsocketMiddleware  # noqa: E402

application = ProtocolTypeRouter(
    {
        # The chat completions endpoint is served before Django (chat.transports.openai_edge).
        "http": OpenAIEdge(django_asgi_app),
        # Origins are checked per bot (its allowed_origins) by the consumers: the widget runs on
        # customers' sites, whose origins ALLOWED_HOSTS knows nothing about.
        "websocket": TenantWebsocketMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
