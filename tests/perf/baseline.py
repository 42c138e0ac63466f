"""The request-overhead benchmark's baseline: a bare view, and stand-ins for the tenant middlewares.

The bare view answers with the same serializer and payload shape as ``GET /api/v1/me/``, with no
authentication or permission check. The stand-ins take the tenant middlewares' places in the
stack and, like them, are sync-only: Django adapts each middleware to the sync or async mode of
its neighbours, and removing the two sync-only ones would switch the async-capable middlewares
around them to async mode, which costs a thread hop per hook and would flatter nothing but the
baseline. Same stack shape, minus the tenant work: the difference is what we measure.

This module is also the benchmark's URLconf: every tenant route, with the bare view in front so
that its URL resolution is never dearer than /me's.
"""

from django.http import HttpRequest, HttpResponse
from django.urls import path
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from config.urls_tenants import urlpatterns as tenant_urlpatterns
from tenants.apis import MeApi

BARE_PATH = "/bench/bare/"
BARE_PAYLOAD = {
    "tenant": "acme",
    "kind": "api_key",
    "scopes": ["admin", "chat", "knowledge:read", "knowledge:write"],
    "email": None,
    "api_key_id": 1,
}
TENANT_MIDDLEWARE = ("tenants.middleware.TenantResolutionMiddleware", "tenants.middleware.TenantMembershipMiddleware")
STAND_IN_MIDDLEWARE = "tests.perf.baseline.PassThroughMiddleware"


class PassThroughMiddleware:
    """Sync-only and does nothing: holds a tenant middleware's place in the baseline stack."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)


def baseline_middleware(middleware: list[str]) -> list[str]:
    return [STAND_IN_MIDDLEWARE if name in TENANT_MIDDLEWARE else name for name in middleware]


class BareApi(APIView):
    authentication_classes = ()
    permission_classes = (AllowAny,)

    def get(self, request):
        return Response(MeApi.OutputSerializer(BARE_PAYLOAD).data)


urlpatterns = [path(BARE_PATH.removeprefix("/"), BareApi.as_view(), name="bench-bare"), *tenant_urlpatterns]
