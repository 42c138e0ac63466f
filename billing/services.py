"""Writes: billing settings, plan changes, invoices and billing-provider events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.budgets import month_bounds
from billing.models import ApiKeyBudget, BillingEvent, Invoice, Plan, TenantBilling
from billing.providers import PAYMENT_FAILED, PAYMENT_SUCCEEDED, WebhookEvent
from billing.selectors import invoice_compute
from tenants.config_epoch import config_changed
from tenants.errors import Conflict, ValidationFailed

logger = structlog.get_logger(__name__)

SUSPENDED_REASON_PAYMENT_FAILED = "payment_failed"
_TENANT_BILLING_FIELDS = frozenset(
    {"monthly_token_budget", "is_budget_hard", "end_user_monthly_tokens", "billing_customer_id"}
)
_UNSET: Any = object()


def _check_budget(value: int | None, *, param: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValidationFailed(f"{param} must be a whole number of tokens, 0 or more, or null.", param=param)


# --- settings -----------------------------------------------------------------------------------


@transaction.atomic
def tenant_billing_update(*, tenant, **changes: Any) -> TenantBilling:
    """Create or change a tenant's billing settings (budget override, hard or soft, per-end-user
    budget, provider customer id). Takes effect on the next request: budgets read it live."""
    unknown = sorted(set(changes) - _TENANT_BILLING_FIELDS)
    if unknown:
        raise ValidationFailed("Unknown field.", param=unknown[0])
    for name in ("monthly_token_budget", "end_user_monthly_tokens"):
        if name in changes:
            _check_budget(changes[name], param=name)
    billing, _created = TenantBilling.objects.select_for_update().get_or_create(tenant=tenant)
    for name, value in changes.items():
        setattr(billing, name, value)
    try:
        with transaction.atomic():
            billing.save()
    except IntegrityError as error:
        raise Conflict("Another tenant already has this billing customer id.", code="duplicate_customer_id") from error
    return billing


def api_key_budget_set(
    *,
    api_key,
    monthly_token_budget: int | None = _UNSET,
    requests_per_minute: int | None = _UNSET,
    tokens_per_minute: int | None = _UNSET,
) -> ApiKeyBudget:
    """Set a key's monthly token budget and rate-limit overrides (null clears one; omitted
    arguments are left as they are)."""
    changes = {
        name: value
        for name, value in (
            ("monthly_token_budget", monthly_token_budget),
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute),
        )
        if value is not _UNSET
    }
    for name, value in changes.items():
        _check_budget(value, param=name)
    budget, _created = ApiKeyBudget.objects.update_or_create(api_key=api_key, defaults=changes)
    return budget


def tenant_plan_change(*, tenant, plan: Plan) -> None:
    """Move a tenant to another plan, effective immediately: budgets and invoices read the plan
    live, and the cached tenant (which rate limits may read) is forgotten after the commit."""
    from tenants.models import Tenant
    from tenants.resolution import tenant_cache_invalidate

    Tenant.objects.filter(pk=tenant.pk).update(plan=plan)
    config_changed()  # the gateway's cached policy (an update() sends no signal)
    tenant.plan = plan
    transaction.on_commit(lambda: tenant_cache_invalidate(tenant))


# --- invoices -----------------------------------------------------------------------------------


def invoice_issue(*, tenant, month: str) -> Invoice:
    """Freeze a (past) month's computation as the tenant's invoice; issuing twice returns the
    first one unchanged."""
    existing = Invoice.objects.filter(tenant_id=tenant.pk, month=month).first()
    if existing is not None:
        return existing
    computed = invoice_compute(tenant=tenant, month=month)
    invoice, _created = Invoice.objects.get_or_create(
        tenant_id=tenant.pk,
        month=month,
        defaults={
            "plan_code": computed.plan_code,
            "included_tokens": computed.included_tokens,
            "used_tokens": computed.used_tokens,
            "overage_tokens": computed.overage_tokens,
            "price_per_1k_extra_tokens": computed.price_per_1k_extra_tokens,
            "amount": computed.amount,
            "lines": computed.lines,
            "status": Invoice.Status.ISSUED,
        },
    )
    return invoice


def invoices_issue_for_month(*, month: str) -> int:
    """Issue the month's invoice of every tenant that existed during it; returns how many new."""
    from tenants.models import Tenant

    _start, end = month_bounds(month)
    month_end = datetime(end.year, end.month, end.day, tzinfo=UTC)
    have = set(Invoice.objects.filter(month=month).values_list("tenant_id", flat=True))
    issued = 0
    for tenant in Tenant.objects.exclude(schema_name="public").filter(created_at__lt=month_end).exclude(pk__in=have):
        invoice_issue(tenant=tenant, month=month)
        issued += 1
    return issued


# --- billing provider events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppliedEvent:
    record: BillingEvent
    is_duplicate: bool


@transaction.atomic
def billing_event_apply(*, event: WebhookEvent) -> AppliedEvent:
    """Apply a verified payment event once: ``payment.succeeded`` makes the tenant's billing
    active and lifts a suspension for failed payment (never one an operator imposed);
    ``payment.failed`` marks it past due and suspends the tenant. Redeliveries are recognised
    by event id; an event older than the last one applied changes nothing; other event types
    and unknown customers are recorded and ignored.
    """
    from tenants.resolution import tenant_cache_invalidate
    from tenants.services import tenant_activate, tenant_suspend

    # The row lock serialises concurrent deliveries for one customer (same event or not).
    billing = None
    if event.customer_id:
        billing = (
            TenantBilling.objects.select_for_update()
            .select_related("tenant")
            .filter(billing_customer_id=event.customer_id)
            .first()
        )
    if event.event_type not in (PAYMENT_SUCCEEDED, PAYMENT_FAILED):
        outcome = BillingEvent.Outcome.IGNORED
    elif billing is None:
        outcome = BillingEvent.Outcome.UNKNOWN_CUSTOMER
    elif (
        event.occurred_at is not None
        and billing.last_payment_event_at is not None
        and event.occurred_at < billing.last_payment_event_at
    ):
        outcome = BillingEvent.Outcome.STALE
    else:
        outcome = BillingEvent.Outcome.APPLIED
    record, created = BillingEvent.objects.get_or_create(
        provider=event.provider,
        event_id=event.event_id,
        defaults={
            "event_type": event.event_type,
            "customer_id": event.customer_id,
            "tenant_id": billing.tenant_id if billing is not None else None,
            "occurred_at": event.occurred_at,
            "payload": event.payload,
            "outcome": outcome,
        },
    )
    if not created:
        return AppliedEvent(record=record, is_duplicate=True)
    if outcome != BillingEvent.Outcome.APPLIED:
        logger.info("billing_event_not_applied", event_id=event.event_id, type=event.event_type, outcome=outcome)
        return AppliedEvent(record=record, is_duplicate=False)

    assert billing is not None
    tenant = billing.tenant
    invoice_status = None
    if event.event_type == PAYMENT_SUCCEEDED:
        billing.status = TenantBilling.Status.ACTIVE
        invoice_status = Invoice.Status.PAID
        if not tenant.is_active and tenant.suspended_reason == SUSPENDED_REASON_PAYMENT_FAILED:
            tenant_activate(tenant=tenant)
    else:
        billing.status = TenantBilling.Status.PAST_DUE
        invoice_status = Invoice.Status.PAYMENT_FAILED
        if tenant.is_active:
            tenant_suspend(tenant=tenant, reason=SUSPENDED_REASON_PAYMENT_FAILED)
    billing.last_payment_event_at = event.occurred_at or timezone.now()
    billing.save(update_fields=["status", "last_payment_event_at", "updated_at"])
    if event.invoice_month:
        Invoice.objects.filter(tenant_id=tenant.pk, month=event.invoice_month).update(status=invoice_status)
    # tenant_activate/suspend forgot the cached tenant before this commit; a request in between
    # may have cached the old status again.
    transaction.on_commit(lambda: tenant_cache_invalidate(tenant))
    logger.info("billing_event_applied", event_id=event.event_id, type=event.event_type, tenant=tenant.slug)
    return AppliedEvent(record=record, is_duplicate=False)
