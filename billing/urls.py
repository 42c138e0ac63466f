"""Billing routes. ``api_urlpatterns``: a tenant's API (tenant and public urlconfs, like every API
route, so that bad credentials on the bare domain get a 401). ``public_urlpatterns``: the
billing provider's webhook, public urlconf only."""

from django.urls import path

from billing import apis, views

api_urlpatterns = [
    path("api/v1/usage/", apis.UsageApi.as_view(), name="usage"),
    path("api/v1/usage/export.csv", apis.UsageExportApi.as_view(), name="usage-export"),
    path("api/v1/usage/invoice/", apis.InvoiceApi.as_view(), name="usage-invoice"),
]

public_urlpatterns = [
    path("api/v1/billing/webhook/", apis.BillingWebhookApi.as_view(), name="billing-webhook"),
]

# The admin site's page (tenant hosts only).
site_urlpatterns = [
    path("usage/", views.usage, name="site-usage"),
]
