"""Operator admin: plans and tenants' billing settings are edited; usage, alerts, invoices and
provider events are read-only records."""

from django.contrib import admin

from billing.models import (
    ApiKeyBudget,
    BillingEvent,
    BudgetAlert,
    Invoice,
    Plan,
    TenantBilling,
    UsageDaily,
    UsageRecord,
)


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = [
        "code",
        "name",
        "included_tokens_per_month",
        "price_per_1k_extra_tokens",
        "requests_per_minute",
        "tokens_per_minute",
        "max_documents",
        "max_bots",
    ]
    search_fields = ["code", "name"]


@admin.register(TenantBilling)
class TenantBillingAdmin(admin.ModelAdmin):
    list_display = [
        "tenant",
        "status",
        "monthly_token_budget",
        "is_budget_hard",
        "end_user_monthly_tokens",
        "billing_customer_id",
    ]
    list_filter = ["status", "is_budget_hard"]
    search_fields = ["tenant__slug", "billing_customer_id"]
    raw_id_fields = ["tenant"]
    readonly_fields = ["status", "last_payment_event_at", "updated_at"]


@admin.register(ApiKeyBudget)
class ApiKeyBudgetAdmin(admin.ModelAdmin):
    list_display = ["api_key", "monthly_token_budget", "requests_per_minute", "tokens_per_minute"]
    search_fields = ["api_key__prefix", "api_key__tenant__slug"]
    raw_id_fields = ["api_key"]


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(UsageDaily)
class UsageDailyAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "day", "bot", "api_key_id", "requests", "cached_requests", "tokens_in", "tokens_out"]
    list_filter = ["day"]
    search_fields = ["tenant__slug", "bot"]
    date_hierarchy = "day"


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "tenant", "occurred_at", "bot", "model", "tokens_in", "tokens_out", "cached"]
    list_filter = ["cached", "provider"]
    search_fields = ["event_id", "tenant__slug", "end_user"]
    date_hierarchy = "occurred_at"
    show_full_result_count = False  # the table is large: no COUNT(*) per page


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "month", "level", "identity", "threshold_percent", "used_tokens", "monthly_tokens"]
    list_filter = ["month", "level", "threshold_percent"]
    search_fields = ["tenant__slug", "identity"]


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = ["tenant", "month", "plan_code", "used_tokens", "overage_tokens", "amount", "status"]
    list_filter = ["month", "status"]
    search_fields = ["tenant__slug"]


@admin.register(BillingEvent)
class BillingEventAdmin(ReadOnlyAdmin):
    list_display = ["provider", "event_id", "event_type", "customer_id", "tenant", "outcome", "received_at"]
    list_filter = ["provider", "event_type", "outcome"]
    search_fields = ["event_id", "customer_id", "tenant__slug"]
