"""URL root for tenant schemas (tenant hosts, and API-key callers on any host)."""

from django.urls import include, path
from oauth2_provider import views as oauth2_views

from billing.urls import api_urlpatterns as billing_api_urlpatterns
from billing.urls import site_urlpatterns as billing_site_urlpatterns
from chat import views as chat_views
from chat.urls import urlpatterns as chat_urlpatterns
from knowledge.urls import site_urlpatterns as knowledge_site_urlpatterns
from knowledge.urls import urlpatterns as knowledge_urlpatterns
from tenants.urls import api_urlpatterns, site_urlpatterns

# Only the protocol endpoints of django-oauth-toolkit: its application and token management pages
# need nothing but a login, so a member could register a client and ask it for admin scope.
# Applications are managed by owners and admins (tenants.services.oauth_application_*).
oauth2_urlpatterns = [
    path("authorize/", oauth2_views.AuthorizationView.as_view(), name="authorize"),
    path("token/", oauth2_views.TokenView.as_view(), name="token"),
    path("revoke_token/", oauth2_views.RevokeTokenView.as_view(), name="revoke-token"),
    path("introspect/", oauth2_views.IntrospectTokenView.as_view(), name="introspect"),
]

# The chat app's admin-site pages (chat/urls.py holds its API routes, shared with the public urlconf).
chat_site_urlpatterns = [
    path("", chat_views.dashboard, name="home"),
    path("bots/", chat_views.bot_list, name="site-bots"),
    path("bots/new/", chat_views.bot_create, name="site-bot-create"),
    path("bots/<str:public_id>/", chat_views.bot_detail, name="site-bot"),
    path("bots/<str:public_id>/edit/", chat_views.bot_edit, name="site-bot-edit"),
    path("bots/<str:public_id>/delete/", chat_views.bot_delete, name="site-bot-delete"),
    path(
        "bots/<str:public_id>/identity-secret/",
        chat_views.bot_identity_secret_rotate,
        name="site-bot-identity-secret",
    ),
    path("conversations/", chat_views.conversation_list, name="site-conversations"),
    path("conversations/<str:conversation_id>/", chat_views.conversation_detail, name="site-conversation"),
]

urlpatterns = [
    path("", include("config.urls_common")),
    *api_urlpatterns,
    *chat_urlpatterns,
    *knowledge_urlpatterns,
    *billing_api_urlpatterns,
    path("o/", include((oauth2_urlpatterns, "oauth2_provider"), namespace="oauth2_provider")),
    *site_urlpatterns,
    *chat_site_urlpatterns,
    *knowledge_site_urlpatterns,
    *billing_site_urlpatterns,
]

handler404 = "tenants.views.not_found"
handler500 = "tenants.views.server_error"
