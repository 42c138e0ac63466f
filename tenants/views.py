"""Server-rendered pages of the tenant admin site that belong to the platform: sign-in and friends."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordResetForm
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views import defaults

from tenants.errors import error_body
from tenants.models import Membership


class LoginView(auth_views.LoginView):
    template_name = "registration/login.html"
    redirect_authenticated_user = True


class LogoutView(auth_views.LogoutView):
    pass


class TenantPasswordResetForm(PasswordResetForm):
    """Only members of the workspace whose host the form is on get a reset link."""

    def __init__(self, *args, tenant=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tenant = tenant

    def get_users(self, email):
        for user in super().get_users(email):
            if self.tenant is not None and Membership.objects.filter(user=user, tenant_id=self.tenant.pk).exists():
                yield user


class PasswordResetView(auth_views.PasswordResetView):
    template_name = "registration/password_reset_form.html"
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"
    form_class = TenantPasswordResetForm

    def get_form_kwargs(self):
        tenant = getattr(self.request, "tenant", None)
        is_tenant = tenant is not None and tenant.schema_name != "public"
        return {**super().get_form_kwargs(), "tenant": tenant if is_tenant else None}


class PasswordResetDoneView(auth_views.PasswordResetDoneView):
    template_name = "registration/password_reset_done.html"


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    template_name = "registration/password_reset_confirm.html"


class PasswordResetCompleteView(auth_views.PasswordResetCompleteView):
    template_name = "registration/password_reset_complete.html"


@login_required
def home(request: HttpRequest) -> HttpResponse:
    memberships = Membership.objects.filter(user=request.user).select_related("tenant").order_by("tenant__name")
    return render(request, "home.html", {"memberships": memberships})


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(("/api/", "/v1/"))


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_body(message=f"No such endpoint: {request.path}", error_type="not_found_error", code="not_found"),
            status=404,
        )
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse(
            error_body(message="Internal error; it has been logged.", error_type="server_error", code="internal_error"),
            status=500,
        )
    return defaults.server_error(request)


def lockout(request: HttpRequest, credentials: dict | None = None, *args, **kwargs) -> HttpResponse:
    """django-axes lockout: JSON in the API's error format on API paths, a page elsewhere."""
    if _is_api(request):
        response = JsonResponse(
            error_body(
                message="Too many failed sign-in attempts; try again later.",
                error_type="rate_limit_error",
                code="too_many_login_attempts",
            ),
            status=429,
        )
    else:
        response = render(request, "registration/locked_out.html", status=429)
    response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
    return response
