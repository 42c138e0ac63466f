"""Platform routes served on tenant hosts (and, for API-key callers, on any host)."""

from django.urls import path

from tenants import apis, views

api_urlpatterns = [
    path("api/v1/me/", apis.MeApi.as_view(), name="api-me"),
    path("api/v1/auth/token/", apis.TokenObtainApi.as_view(), name="api-token-obtain"),
    path("api/v1/auth/token/refresh/", apis.TokenRefreshApi.as_view(), name="api-token-refresh"),
    path("api/v1/api-keys/", apis.ApiKeyListCreateApi.as_view(), name="api-keys"),
    path("api/v1/api-keys/<int:api_key_id>/", apis.ApiKeyDetailApi.as_view(), name="api-key-detail"),
]

site_urlpatterns = [
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", views.LogoutView.as_view(), name="logout"),
    path("accounts/password-reset/", views.PasswordResetView.as_view(), name="password_reset"),
    path("accounts/password-reset/done/", views.PasswordResetDoneView.as_view(), name="password_reset_done"),
    path("accounts/reset/<uidb64>/<token>/", views.PasswordResetConfirmView.as_view(), name="password_reset_confirm"),
    path("accounts/reset/done/", views.PasswordResetCompleteView.as_view(), name="password_reset_complete"),
    path("invitations/<str:token>/", views.invitation_accept, name="site-invitation-accept"),
    path("settings/api-keys/", views.api_keys, name="site-api-keys"),
    path("settings/api-keys/<int:api_key_id>/revoke/", views.api_key_revoke, name="site-api-key-revoke"),
    path("settings/members/", views.members, name="site-members"),
    path("settings/members/<int:membership_id>/role/", views.member_role, name="site-member-role"),
    path("settings/members/<int:membership_id>/remove/", views.member_remove, name="site-member-remove"),
    path("settings/invitations/<int:invitation_id>/revoke/", views.invitation_revoke, name="site-invitation-revoke"),
]
