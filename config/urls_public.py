"""URL root for the public schema: the operator's Django admin and the API's entry points.

API routes are mounted here too so that a caller with a bad credential on the bare domain gets
a 401 in the API's error format rather than a 404 page.
"""

from django.contrib import admin
from django.urls import include, path

from billing.urls import api_urlpatterns as billing_api_urlpatterns
from billing.urls import public_urlpatterns as billing_public_urlpatterns
from chat.urls import urlpatterns as chat_urlpatterns
from knowledge.urls import urlpatterns as knowledge_urlpatterns
from tenants.urls import api_urlpatterns

urlpatterns = [
    path("", include("config.urls_common")),
    path("admin/", admin.site.urls),
    *api_urlpatterns,
    *chat_urlpatterns,
    *knowledge_urlpatterns,
    *billing_api_urlpatterns,
    *billing_public_urlpatterns,
]

handler404 = "tenants.views.not_found"
handler500 = "tenants.views.server_error"
