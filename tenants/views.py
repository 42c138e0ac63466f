"""Server-rendered pages of the tenant admin site that belong to the platform: sign-in and friends,
the access check every page goes through, the dashboard, API keys and members."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from functools import partial, wraps

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth import authenticate, login, password_validation
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import PasswordResetForm
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views import defaults
from django.views.decorators.http import require_POST

from tenants import selectors, services
from tenants.errors import NotFound, ParleyError, PermissionDeniedError, ValidationFailed, error_body
from tenants.middleware import TenantRequest
from tenants.models import ApiKey, Membership, Tenant, User


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
    response: HttpResponse
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


# --- the admin site: access, layout helpers ------------------------------------------------------


def forbidden(request: HttpRequest, message: str = "") -> HttpResponse:
    return render(request, "403.html", {"message": message}, status=403)


def _site_url(request: HttpRequest, tenant: Tenant) -> str:
    port = request.get_port()
    suffix = f":{port}" if port and port not in ("80", "443") else ""
    return f"{request.scheme}://{tenant.slug}.{settings.PARLEY_BASE_DOMAIN}{suffix}/"


@dataclass(frozen=True)
class WorkspaceLink:
    """A workspace in the tenant switcher: the user's membership and that workspace's site."""

    membership: Membership
    url: str


class SiteRequest(TenantRequest):
    """A request as ``site_page`` hands it to a view. For type checkers only (views declare
    ``request: SiteRequest``); requests keep their own class."""

    user: User  # signed in, a member of ``tenant``
    membership: Membership  # the user's in ``tenant``
    workspace_links: list[WorkspaceLink]  # every workspace of the user, for the tenant switcher


def site_page(*, admin: bool = False) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Every admin-site view goes through this: a tenant host, a signed-in member of that tenant
    (else the sign-in page), the owner/admin role where ``admin`` (else a 403 page). Hands the
    view ``request.membership`` and, for the tenant switcher, ``request.workspace_links``. Domain
    lookups that find nothing (missing, or another tenant's ids) become 404 pages."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @wraps(view)
        def wrapper(request: SiteRequest, *args, **kwargs) -> HttpResponse:
            tenant = getattr(request, "tenant", None)
            if tenant is None or tenant.schema_name == "public":
                raise Http404("The admin site lives on a workspace's own host.")
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            memberships = selectors.membership_list_for_user(user=request.user)
            current = next((m for m in memberships if m.tenant_id == tenant.pk), None)
            if current is None:
                return redirect_to_login(request.get_full_path())
            request.membership = current
            request.workspace_links = [
                WorkspaceLink(membership=membership, url=_site_url(request, membership.tenant))
                for membership in memberships
            ]
            if admin and not current.is_admin:
                return forbidden(request, "This page is for the workspace's owners and admins.")
            try:
                return view(request, *args, **kwargs)
            except NotFound as error:
                raise Http404(error.message) from error
            except PermissionDeniedError as error:
                return forbidden(request, error.message)

        return wrapper

    return decorator


def form_error(form: forms.Form, error: ParleyError, fields: dict[str, str] | None = None) -> None:
    """Put a domain error on the form field it names (``param``), else on the form."""
    param = (error.param or "").split(".")
    candidates = [(fields or {}).get(error.param or ""), (fields or {}).get(param[0]), error.param, param[0], param[-1]]
    field = next((name for name in candidates if name and name in form.fields), None)
    form.add_error(field, error.message)


# --- charts: server-rendered SVG ----------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT, CHART_PAD = 640, 180, 28


def _nice_ceiling(value: float) -> float:
    if value <= 0:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def chart(*, title: str, days: list[date], series: list[tuple[str, list[float | None]]], kind: str = "bar") -> dict:
    """Geometry of a small chart over days: stacked-free bars (first series) or lines (each
    series), a y-axis maximum rounded up to a readable number, and a text summary for screen
    readers. Templates only draw what this computes."""
    plot_width, plot_height = CHART_WIDTH - CHART_PAD * 2, CHART_HEIGHT - CHART_PAD * 2
    values = [value for _, points in series for value in points if value is not None]
    top = _nice_ceiling(max(values, default=0))
    count = max(len(days), 1)
    slot = plot_width / count

    def y_of(value: float) -> float:
        return CHART_PAD + plot_height - (value / top) * plot_height

    drawn = []
    for index, (name, points) in enumerate(series):
        if kind == "bar":
            bars = [
                {
                    "x": round(CHART_PAD + i * slot + slot * 0.15, 2),
                    "y": round(y_of(value or 0), 2),
                    "width": round(max(slot * 0.7, 1), 2),
                    "height": round(plot_height - (y_of(value or 0) - CHART_PAD), 2),
                    "label": f"{days[i]:%b %d}: {value or 0:g}",
                }
                for i, value in enumerate(points)
            ]
            drawn.append({"name": name, "bars": bars, "index": index})
        else:
            coordinates = [
                f"{CHART_PAD + i * slot + slot / 2:.2f},{y_of(value):.2f}"
                for i, value in enumerate(points)
                if value is not None
            ]
            drawn.append({"name": name, "points": " ".join(coordinates), "index": index})
    ticks = [{"y": round(y_of(top * f), 2), "label": f"{top * f:g}"} for f in (0, 0.5, 1)]
    labels = [
        {"x": round(CHART_PAD + i * slot + slot / 2, 2), "text": f"{day:%b %d}"}
        for i, day in enumerate(days)
        if i in (0, len(days) - 1, len(days) // 2)
    ]
    summary = "; ".join(
        f"{name}: total {sum(v for v in points if v is not None):g}"
        if kind == "bar"
        else f"{name}: max {max((v for v in points if v is not None), default=0):g}"
        for name, points in series
    )
    return {
        "title": title,
        "kind": kind,
        "series": drawn,
        "ticks": ticks,
        "labels": labels,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "pad": CHART_PAD,
        "right": CHART_WIDTH - CHART_PAD,
        "summary": f"{title} — {summary}",
    }


# --- API keys -----------------------------------------------------------------------------------


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Where the key is used, e.g. “support backend”.")
    scopes = forms.MultipleChoiceField(
        choices=ApiKey.Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="Admin includes every other scope.",
    )
    expires_on = forms.DateField(
        required=False,
        label="Expires on",
        help_text="Optional; the key stops working at the start of this day (UTC).",
        widget=forms.DateInput(attrs={"type": "date"}),
    )


@site_page(admin=True)
def api_keys(request: SiteRequest) -> HttpResponse:
    """List and create. A created key's secret is rendered in this response only: it is never
    stored (only its hash is), so it cannot be shown again."""
    form = ApiKeyForm(request.POST or None, initial={"scopes": [ApiKey.Scope.CHAT]})
    created = None
    if request.method == "POST" and form.is_valid():
        expires_on = form.cleaned_data["expires_on"]
        try:
            created = services.api_key_create(
                tenant=request.tenant,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                created_by=request.user,
                expires_at=datetime.combine(expires_on, time.min, tzinfo=UTC) if expires_on else None,
            )
        except ValidationFailed as error:
            form_error(form, error, {"expires_at": "expires_on"})
        else:
            form = ApiKeyForm(initial={"scopes": [ApiKey.Scope.CHAT]})
    keys = selectors.api_key_list(tenant=request.tenant).select_related("created_by")
    return render(
        request,
        "site/settings/api_keys.html",
        {"form": form, "keys": keys, "created": created, "now": timezone.now(), "nav": "api_keys"},
        status=400 if form.errors else (201 if created else 200),
    )


@site_page(admin=True)
@require_POST
def api_key_revoke(request: SiteRequest, api_key_id: int) -> HttpResponse:
    api_key = selectors.api_key_get(tenant=request.tenant, api_key_id=api_key_id)
    services.api_key_revoke(api_key=api_key)
    messages.success(request, f"Key “{api_key.name}” ({api_key.prefix}) revoked.")
    return redirect("site-api-keys")


# --- members and invitations --------------------------------------------------------------------


class InviteForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


def _may_grant(actor: Membership, role: str) -> bool:
    """Admins manage members and admins; only owners make, unmake or remove owners."""
    return actor.role == Membership.Role.OWNER or role != Membership.Role.OWNER


@site_page(admin=True)
def members(request: SiteRequest) -> HttpResponse:
    form = InviteForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        role = form.cleaned_data["role"]
        if not _may_grant(request.membership, role):
            form.add_error("role", "Only owners can invite owners.")
        else:
            try:
                services.invitation_create(
                    tenant=request.tenant,
                    email=form.cleaned_data["email"],
                    role=role,
                    invited_by=request.user,
                    accept_url=lambda token: request.build_absolute_uri(
                        reverse("site-invitation-accept", args=[token])
                    ),
                )
            except ParleyError as error:
                form_error(form, error)
            else:
                messages.success(request, f"Invitation sent to {form.cleaned_data['email']}.")
                return redirect("site-members")
    return render(
        request,
        "site/settings/members.html",
        {
            "form": form,
            "memberships": selectors.membership_list(tenant=request.tenant),
            "invitations": selectors.invitation_list_pending(tenant=request.tenant),
            "roles": Membership.Role.choices,
            "nav": "members",
        },
        status=400 if form.errors else 200,
    )


@site_page(admin=True)
@require_POST
def member_role(request: SiteRequest, membership_id: int) -> HttpResponse:
    membership = selectors.membership_get(tenant=request.tenant, membership_id=membership_id)
    role = request.POST.get("role", "")
    if not (_may_grant(request.membership, role) and _may_grant(request.membership, membership.role)):
        return forbidden(request, "Only owners can make, change or remove owners.")
    try:
        services.membership_role_change(membership=membership, role=role)
    except ParleyError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"{membership.user.email} is now {membership.get_role_display()}.")
    return redirect("site-members")


@site_page(admin=True)
@require_POST
def member_remove(request: SiteRequest, membership_id: int) -> HttpResponse:
    membership = selectors.membership_get(tenant=request.tenant, membership_id=membership_id)
    if not _may_grant(request.membership, membership.role):
        return forbidden(request, "Only owners can remove owners.")
    try:
        services.membership_remove(membership=membership)
    except ParleyError as error:
        messages.error(request, error.message)
        return redirect("site-members")
    messages.success(request, f"{membership.user.email} removed.")
    if membership.user_id == request.user.pk:
        return redirect("login")
    return redirect("site-members")


@site_page(admin=True)
@require_POST
def invitation_revoke(request: SiteRequest, invitation_id: int) -> HttpResponse:
    invitation = selectors.invitation_get(tenant=request.tenant, invitation_id=invitation_id)
    services.invitation_revoke(invitation=invitation)
    messages.success(request, f"Invitation to {invitation.email} revoked.")
    return redirect("site-members")


class AcceptForm(forms.Form):
    password = forms.CharField(widget=forms.PasswordInput(attrs={"autocomplete": "current-password"}))


class AcceptNewUserForm(forms.Form):
    full_name = forms.CharField(max_length=200, required=False, label="Your name")
    password1 = forms.CharField(
        label="Choose a password", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )
    password2 = forms.CharField(
        label="Repeat the password", widget=forms.PasswordInput(attrs={"autocomplete": "new-password"})
    )

    def __init__(self, *args, email: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.email = email

    def clean(self):
        data = super().clean()
        if data.get("password1") and data.get("password1") != data.get("password2"):
            self.add_error("password2", "The two passwords differ.")
        elif data.get("password1"):
            try:
                password_validation.validate_password(data["password1"], User(email=self.email))
            except DjangoValidationError as error:
                self.add_error("password1", error)
        return data


def invitation_accept(request: HttpRequest, token: str) -> HttpResponse:
    """The emailed link. An existing user confirms with their password; a new one chooses one.
    Either way they end up signed in, as a member, on this tenant's dashboard."""
    tenant = getattr(request, "tenant", None)
    if tenant is None or tenant.schema_name == "public":
        raise Http404
    try:
        invitation = selectors.invitation_get_by_token(tenant=tenant, token=token)
    except NotFound:
        return render(request, "site/invitation_invalid.html", status=404)
    user = User.objects.filter(email__iexact=invitation.email).first()
    form = (AcceptForm if user is not None else partial(AcceptNewUserForm, email=invitation.email))(
        request.POST or None
    )
    if request.method == "POST" and form.is_valid():
        if user is not None:
            user = authenticate(request, username=invitation.email, password=form.cleaned_data["password"])
            if user is None:
                form.add_error("password", "That is not the password of this account.")
        else:
            user = services.user_create(
                email=invitation.email,
                password=form.cleaned_data["password1"],
                full_name=form.cleaned_data["full_name"],
            )
        if user is not None:
            try:
                services.invitation_accept(invitation=invitation, user=user)
            except ParleyError as error:
                form.add_error(None, error.message)
            else:
                login(request, user, backend="django.contrib.auth.backends.ModelBackend")
                messages.success(request, f"Welcome to {tenant.name}.")
                return redirect("home")
    return render(
        request,
        "site/invitation_accept.html",
        {"invitation": invitation, "form": form, "existing": user is not None or isinstance(form, AcceptForm)},
        status=400 if form.errors else 200,
    )
