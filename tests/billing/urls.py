"""Test-only urlconf: the platform's routes plus billing's, until config wires ``billing.urls``.

Used as both ROOT_URLCONF and PUBLIC_SCHEMA_URLCONF (``override_settings``) by the API tests.
"""

from billing.urls import api_urlpatterns, public_urlpatterns
from config.urls_tenants import urlpatterns as tenant_urlpatterns

urlpatterns = [*api_urlpatterns, *public_urlpatterns, *tenant_urlpatterns]

handler404 = "tenants.views.not_found"
handler500 = "tenants.views.server_error"
