"""URL root for tenant schemas (tenant hosts, and API-key callers on any host)."""

from django.urls import include, path

from billing.urls import api_urlpatterns as billing_api_urlpatterns
from chat.urls import urlpatterns as chat_urlpatterns
from knowledge.urls import urlpatterns as knowledge_urlpatterns
from tenants.urls import api_urlpatterns, site_urlpatterns

urlpatterns = [
    path("", include("config.urls_common")),
    *api_urlpatterns,
    *chat_urlpatterns,
    *knowledge_urlpatterns,
    *billing_api_urlpatterns,
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    *site_urlpatterns,
]

handler404 = "tenants.views.not_found"
handler500 = "tenants.views.server_error"
