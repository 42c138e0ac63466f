"""Public-schema billing models: plans, per-tenant and per-key billing settings, usage, invoices.

Everything here lives in the public schema (``billing`` is a shared app): usage is written by a
platform-wide flusher, invoices are computed across tenants, and the billing provider's webhook
arrives on the bare domain. Rows that belong to a tenant carry its foreign key and are always
queried by it.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import models
from django.db.models import Q
from django.utils import timezone


class Plan(models.Model):
    code = models.SlugField(max_length=50, unique=True)
    name = models.CharField(max_length=100)
    included_tokens_per_month = models.BigIntegerField(default=1_000_000)
    price_per_1k_extra_tokens = models.DecimalField(max_digits=10, decimal_places=4, default=Decimal("0.0020"))
    requests_per_minute = models.PositiveIntegerField(default=600)
    tokens_per_minute = models.PositiveIntegerField(default=200_000)
    max_documents = models.PositiveIntegerField(default=1_000)
    max_storage_bytes = models.BigIntegerField(default=1024**3)
    max_upload_bytes = models.BigIntegerField(default=25 * 1024**2)
    max_bots = models.PositiveIntegerField(default=10)

    class Meta:
        ordering = ["code"]

    def __str__(self) -> str:
        return self.name


class TenantBilling(models.Model):
    """A tenant's billing settings; a tenant without a row gets the defaults (hard plan budget)."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PAST_DUE = "past_due", "Past due"

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="billing")
    # Overrides the plan's included tokens as the tenant's monthly budget (null: the plan's).
    monthly_token_budget = models.BigIntegerField(null=True, blank=True)
    # Hard: requests beyond the budget are refused (402). Soft: they are served, alerted on and
    # billed as overage at the plan's price.
    is_budget_hard = models.BooleanField(default=True)
    # Every end user of the tenant gets this many tokens a month (null: no per-end-user budget).
    end_user_monthly_tokens = models.BigIntegerField(null=True, blank=True)
    billing_customer_id = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ACTIVE)
    # The provider's timestamp of the last payment event applied: an older event delivered late
    # must not undo a newer one.
    last_payment_event_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["billing_customer_id"],
                condition=~Q(billing_customer_id=""),
                name="tenantbilling_unique_customer_id",
            ),
            models.CheckConstraint(
                condition=Q(monthly_token_budget__isnull=True) | Q(monthly_token_budget__gte=0),
                name="tenantbilling_budget_not_negative",
            ),
            models.CheckConstraint(
                condition=Q(end_user_monthly_tokens__isnull=True) | Q(end_user_monthly_tokens__gte=0),
                name="tenantbilling_end_user_budget_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"billing of {self.tenant}"


class ApiKeyBudget(models.Model):
    """Per-key limits: a monthly token budget (always hard) and rate-limit overrides of the plan's."""

    api_key = models.OneToOneField("tenants.ApiKey", on_delete=models.CASCADE, related_name="budget")
    monthly_token_budget = models.BigIntegerField(null=True, blank=True)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(monthly_token_budget__isnull=True) | Q(monthly_token_budget__gte=0),
                name="apikeybudget_budget_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"budget of key {self.api_key_id}"


class UsageRecord(models.Model):
    """One request's usage, written in batches by ``billing.metering.usage_flush``."""

    event_id = models.CharField(max_length=100, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="usage_records")
    occurred_at = models.DateTimeField()
    bot = models.CharField(max_length=40, blank=True, default="")
    # Not a foreign key: usage outlives a deleted key and is never rewritten.
    api_key_id = models.BigIntegerField(null=True, blank=True)
    end_user = models.CharField(max_length=200, blank=True, default="")
    provider = models.CharField(max_length=100, blank=True, default="")
    model = models.CharField(max_length=200, blank=True, default="")
    tokens_in = models.PositiveIntegerField(default=0)
    tokens_out = models.PositiveIntegerField(default=0)
    cached = models.BooleanField(default=False)
    cache_layer = models.CharField(max_length=20, blank=True, default="")
    latency_ms = models.FloatField(default=0.0)
    ttft_ms = models.FloatField(null=True, blank=True)
    recorded_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "occurred_at"], name="usagerecord_tenant_time"),
            # Initialises an end user's budget counter after a Redis loss.
            models.Index(fields=["tenant", "end_user", "occurred_at"], name="usagerecord_tenant_user_time"),
        ]

    def __str__(self) -> str:
        return self.event_id


class UsageDaily(models.Model):
    """Per tenant, UTC day, bot and key: counters only ever changed by atomic upserts."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="usage_daily")
    day = models.DateField()
    bot = models.CharField(max_length=40, blank=True, default="")
    api_key_id = models.BigIntegerField(default=0)  # 0: no key (widget visitors, session users)
    requests = models.BigIntegerField(default=0)
    cached_requests = models.BigIntegerField(default=0)
    tokens_in = models.BigIntegerField(default=0)
    tokens_out = models.BigIntegerField(default=0)
    # Tokens (in + out) of requests answered from the cache: counted, never billed.
    cached_tokens = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "day", "bot", "api_key_id"], name="usagedaily_unique_bucket"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.day} {self.bot or '-'} key {self.api_key_id}"


class BudgetAlert(models.Model):
    """A budget level crossed a threshold (percent) in a month; recorded once."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="budget_alerts")
    month = models.CharField(max_length=7)  # YYYY-MM
    level = models.CharField(max_length=20)  # tenant | key | end_user
    identity = models.CharField(max_length=200)
    threshold_percent = models.PositiveSmallIntegerField()
    monthly_tokens = models.BigIntegerField()
    used_tokens = models.BigIntegerField()
    is_hard = models.BooleanField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "month", "level", "identity", "threshold_percent"], name="budgetalert_unique"
            ),
        ]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month} {self.level}:{self.identity} {self.threshold_percent}%"


class Invoice(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        ISSUED = "issued", "Issued"
        PAID = "paid", "Paid"
        PAYMENT_FAILED = "payment_failed", "Payment failed"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="invoices")
    month = models.CharField(max_length=7)  # YYYY-MM
    plan_code = models.CharField(max_length=50, blank=True, default="")
    included_tokens = models.BigIntegerField()
    used_tokens = models.BigIntegerField()
    overage_tokens = models.BigIntegerField()
    price_per_1k_extra_tokens = models.DecimalField(max_digits=10, decimal_places=4)
    amount = models.DecimalField(max_digits=14, decimal_places=2)
    lines = models.JSONField(default=list)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ISSUED)
    issued_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "month"], name="invoice_unique_tenant_month")]
        ordering = ["-month"]

    def __str__(self) -> str:
        return f"{self.tenant_id} {self.month}"


class BillingEvent(models.Model):
    """A billing provider's webhook event, stored once: redeliveries are recognised by id."""

    class Outcome(models.TextChoices):
        APPLIED = "applied", "Applied"
        IGNORED = "ignored", "Ignored"
        STALE = "stale", "Older than the last applied event"
        UNKNOWN_CUSTOMER = "unknown_customer", "Unknown customer"

    provider = models.CharField(max_length=50)
    event_id = models.CharField(max_length=200)
    event_type = models.CharField(max_length=100)
    customer_id = models.CharField(max_length=200, blank=True, default="")
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="billing_events"
    )
    occurred_at = models.DateTimeField(null=True, blank=True)
    payload = models.JSONField(default=dict)
    outcome = models.CharField(max_length=20, choices=Outcome.choices)
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="billingevent_unique_provider_event"),
        ]
        ordering = ["-received_at"]

    def __str__(self) -> str:
        return f"{self.provider}:{self.event_id} {self.event_type}"
