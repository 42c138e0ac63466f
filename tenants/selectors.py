"""Reads of the platform models, each scoped to the tenant the caller already proved."""

from __future__ import annotations

from django.db.models import QuerySet
from django.utils import timezone

from tenants.errors import NotFound
from tenants.models import ApiKey, Invitation, Membership, Tenant


def api_key_list(*, tenant: Tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).order_by("-created_at")


def api_key_get(*, tenant: Tenant, api_key_id: int) -> ApiKey:
    api_key = ApiKey.objects.filter(tenant=tenant, pk=api_key_id).first()
    if api_key is None:
        raise NotFound("No such API key.")
    return api_key


def tenant_get_by_slug(*, slug: str) -> Tenant:
    tenant = Tenant.objects.filter(slug=slug).first()
    if tenant is None:
        raise NotFound(f"No tenant with slug {slug!r}.")
    return tenant


def membership_list_for_user(*, user) -> list[Membership]:
    """Every workspace a person belongs to (the tenant switcher), in one query."""
    return list(Membership.objects.filter(user_id=user.pk).select_related("tenant").order_by("tenant__name"))


def membership_list(*, tenant: Tenant) -> QuerySet[Membership]:
    return Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__email")


def membership_get(*, tenant: Tenant, membership_id: int) -> Membership:
    membership = Membership.objects.select_related("user", "tenant").filter(tenant=tenant, pk=membership_id).first()
    if membership is None:
        raise NotFound("No such member.")
    return membership


def invitation_list_pending(*, tenant: Tenant) -> QuerySet[Invitation]:
    return Invitation.objects.filter(
        tenant=tenant, accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    ).order_by("-created_at")


def invitation_get(*, tenant: Tenant, invitation_id: int) -> Invitation:
    invitation = Invitation.objects.filter(tenant=tenant, pk=invitation_id).first()
    if invitation is None:
        raise NotFound("No such invitation.")
    return invitation


def invitation_get_by_token(*, tenant: Tenant, token: str) -> Invitation:
    """The pending invitation behind a link, on the tenant whose host the link points at."""
    from tenants.services import invitation_token_hash

    invitation = invitation_list_pending(tenant=tenant).filter(token_hash=invitation_token_hash(token)).first()
    if invitation is None:
        raise NotFound("This invitation link is not valid: it may have expired, been used or been revoked.")
    return invitation
