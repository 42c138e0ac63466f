"""Invoices: computed from the daily aggregates and the tenant's current plan; issued once."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from billing.budgets import current_month, month_bounds
from billing.models import Invoice, Plan, UsageDaily
from billing.selectors import InvoiceComputation, invoice_compute, invoice_for_month, months_ago
from billing.services import invoice_issue, invoices_issue_for_month, tenant_plan_change
from tenants.models import Tenant

pytestmark = pytest.mark.django_db


def daily(tenant, day: date, bot: str, *, tokens_in: int, tokens_out: int = 0, cached_tokens: int = 0):
    return UsageDaily.objects.create(
        tenant=tenant,
        day=day,
        bot=bot,
        requests=1,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cached_tokens=cached_tokens,
    )


@pytest.fixture
def starter():
    return Plan.objects.create(
        code="starter-test",
        name="Starter",
        included_tokens_per_month=1_000_000,
        price_per_1k_extra_tokens=Decimal("0.0020"),
    )


@pytest.fixture
def pro():
    return Plan.objects.create(
        code="pro-test", name="Pro", included_tokens_per_month=2_000_000, price_per_1k_extra_tokens=Decimal("0.0010")
    )


@pytest.fixture
def acme(tenant_pair, starter):
    tenant_plan_change(tenant=Tenant.objects.get(pk=tenant_pair.a.pk), plan=starter)
    return tenant_pair.a


def line(bot: str, requests: int, tokens_in: int, tokens_out: int, cached_tokens: int) -> dict:
    return {
        "bot": bot,
        "requests": requests,
        "cached_requests": 0,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cached_tokens": cached_tokens,
        "billable_tokens": tokens_in + tokens_out - cached_tokens,
    }


def test_overage_beyond_the_included_tokens_is_billed_per_1k_rounded_half_up(acme, tenant_pair):
    daily(acme, date(2026, 10, 1), "bot_alpha", tokens_in=2_000_000, tokens_out=500_000, cached_tokens=100_000)
    daily(acme, date(2026, 10, 31), "bot_beta", tokens_in=102_500)
    daily(acme, date(2026, 9, 30), "bot_alpha", tokens_in=7_000_000)  # another month
    daily(acme, date(2026, 11, 1), "bot_alpha", tokens_in=7_000_000)  # another month
    daily(tenant_pair.b, date(2026, 10, 1), "bot_alpha", tokens_in=7_000_000)  # another tenant

    invoice = invoice_compute(tenant=acme, month="2026-10")

    assert invoice == InvoiceComputation(
        month="2026-10",
        plan_code="starter-test",
        plan_name="Starter",
        included_tokens=1_000_000,
        used_tokens=2_502_500,
        overage_tokens=1_502_500,
        price_per_1k_extra_tokens=Decimal("0.0020"),
        amount=Decimal("3.01"),  # 1,502.5 thousand at 0.002 = 3.005
        lines=[line("bot_alpha", 1, 2_000_000, 500_000, 100_000), line("bot_beta", 1, 102_500, 0, 0)],
    )


def test_usage_within_the_included_tokens_costs_nothing(acme):
    daily(acme, date(2026, 10, 5), "bot_alpha", tokens_in=999_999, tokens_out=1)

    invoice = invoice_compute(tenant=acme, month="2026-10")

    assert (invoice.used_tokens, invoice.overage_tokens, invoice.amount) == (1_000_000, 0, Decimal("0.00"))


def test_a_month_without_usage_is_an_empty_invoice(acme):
    invoice = invoice_compute(tenant=acme, month="2026-10")

    assert (invoice.used_tokens, invoice.amount, invoice.lines) == (0, Decimal("0.00"), [])


def test_a_plan_change_reprices_the_open_month_at_once(acme, pro):
    daily(acme, date(2026, 10, 5), "bot_alpha", tokens_in=3_000_000)
    assert invoice_compute(tenant=acme, month="2026-10").amount == Decimal("4.00")

    tenant_plan_change(tenant=Tenant.objects.get(pk=acme.pk), plan=pro)

    invoice = invoice_compute(tenant=acme, month="2026-10")  # ``acme`` is the stale object: read live
    assert (invoice.plan_code, invoice.included_tokens, invoice.overage_tokens, invoice.amount) == (
        "pro-test",
        2_000_000,
        1_000_000,
        Decimal("1.00"),
    )


def test_a_tenant_without_plan_is_billed_on_the_default_plan(tenant_pair):
    Tenant.objects.filter(pk=tenant_pair.a.pk).update(plan=None)
    daily(tenant_pair.a, date(2026, 10, 5), "bot_alpha", tokens_in=1_500_000)

    invoice = invoice_compute(tenant=tenant_pair.a, month="2026-10")

    assert (invoice.plan_code, invoice.included_tokens, invoice.price_per_1k_extra_tokens, invoice.amount) == (
        "",
        1_000_000,
        Decimal("0.0020"),
        Decimal("1.00"),
    )


def test_invoice_computation_costs_two_queries(acme, django_assert_num_queries):
    daily(acme, date(2026, 10, 5), "bot_alpha", tokens_in=1)

    with django_assert_num_queries(2):
        invoice_compute(tenant=acme, month="2026-10")


def test_an_issued_invoice_is_frozen_against_later_plan_changes(acme, pro):
    daily(acme, date(2026, 10, 5), "bot_alpha", tokens_in=3_000_000)
    issued = invoice_issue(tenant=acme, month="2026-10")
    tenant_plan_change(tenant=Tenant.objects.get(pk=acme.pk), plan=pro)
    daily(acme, date(2026, 10, 6), "bot_beta", tokens_in=5)  # late usage does not rewrite it either

    again = invoice_issue(tenant=acme, month="2026-10")
    shown = invoice_for_month(tenant=acme, month="2026-10")

    assert again.pk == issued.pk
    assert (issued.plan_code, issued.used_tokens, issued.amount, issued.status) == (
        "starter-test",
        3_000_000,
        Decimal("4.00"),
        "issued",
    )
    assert (shown.plan_code, shown.plan_name, shown.used_tokens, shown.amount, shown.status) == (
        "starter-test",
        "Starter",
        3_000_000,
        Decimal("4.00"),
        "issued",
    )
    assert shown.issued_at == issued.issued_at
    assert Invoice.objects.filter(tenant=acme).count() == 1


def test_issuing_a_month_covers_every_tenant_that_existed_and_is_idempotent(acme, tenant_pair):
    month = current_month()
    daily(acme, month_bounds(month)[0], "bot_alpha", tokens_in=1_000_001)

    first = invoices_issue_for_month(month=month)
    second = invoices_issue_for_month(month=month)

    issued = dict(Invoice.objects.filter(month=month).values_list("tenant_id", "amount"))
    assert first == len(issued)
    assert second == 0
    assert issued[acme.pk] == Decimal("0.00")  # 1 token over: 0.000002, rounds to nothing
    assert issued[tenant_pair.b.pk] == Decimal("0.00")


def test_tenants_created_after_a_month_get_no_invoice_for_it(tenant_pair):
    Tenant.objects.filter(pk__in=[tenant_pair.a.pk, tenant_pair.b.pk]).update(created_at="2026-10-15T00:00:00Z")

    invoices_issue_for_month(month="2026-09")

    assert not Invoice.objects.filter(month="2026-09", tenant__in=[tenant_pair.a.pk, tenant_pair.b.pk]).exists()


def test_months_ago_crosses_years():
    from datetime import UTC, datetime

    assert months_ago(datetime(2027, 1, 15, tzinfo=UTC), 1) == "2026-12"
    assert months_ago(datetime(2026, 11, 15, tzinfo=UTC), 0) == "2026-11"
    assert months_ago(datetime(2026, 11, 15, tzinfo=UTC), 23) == "2024-12"


def test_the_beat_task_issues_last_months_invoices(tenant_pair):
    from datetime import UTC, datetime

    from billing.tasks import invoices_issue_task

    last_month = months_ago(datetime.now(tz=UTC), 1)
    start = month_bounds(last_month)[0]
    Tenant.objects.filter(pk__in=[tenant_pair.a.pk, tenant_pair.b.pk]).update(
        created_at=f"{start.isoformat()}T00:00:00Z"
    )
    daily(tenant_pair.a, start, "bot_alpha", tokens_in=1_500_000)

    invoices_issue_task()
    invoices_issue_task()

    assert list(
        Invoice.objects.filter(month=last_month, tenant__in=[tenant_pair.a.pk, tenant_pair.b.pk])
        .order_by("tenant__slug")
        .values_list("tenant__slug", "used_tokens", "amount")
    ) == [("acme", 1_500_000, Decimal("1.00")), ("globex", 0, Decimal("0.00"))]


# --- operator admin -----------------------------------------------------------------------------


@pytest.fixture
def operator_client():
    from django.test import Client

    from tenants.models import User

    client = Client()
    client.force_login(User.objects.create_superuser(email="ops@parley.test", password="operator-password"))
    return client


@pytest.mark.parametrize(
    "model",
    ["plan", "tenantbilling", "apikeybudget", "usagedaily", "usagerecord", "budgetalert", "invoice", "billingevent"],
)
def test_operator_admin_lists_every_billing_model(operator_client, acme, model):
    daily(acme, date(2026, 10, 1), "bot_alpha", tokens_in=5)
    invoice_issue(tenant=acme, month="2026-10")

    response = operator_client.get(f"/admin/billing/{model}/")

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("model", "status"), [("usagedaily", 403), ("invoice", 403), ("billingevent", 403), ("plan", 200)]
)
def test_usage_invoices_and_provider_events_cannot_be_written_in_the_admin(operator_client, model, status):
    response = operator_client.get(f"/admin/billing/{model}/add/")

    assert response.status_code == status


def test_operator_sets_a_tenants_budget_in_the_admin(operator_client, acme):
    from billing.models import TenantBilling

    billing = TenantBilling.objects.create(tenant=acme)
    response = operator_client.post(
        f"/admin/billing/tenantbilling/{billing.pk}/change/",
        {
            "tenant": acme.pk,
            "monthly_token_budget": "250000",
            "is_budget_hard": "",
            "end_user_monthly_tokens": "",
            "billing_customer_id": "cus_acme",
        },
    )

    assert response.status_code == 302, response.content[:2000]
    billing.refresh_from_db()
    assert (billing.monthly_token_budget, billing.is_budget_hard, billing.billing_customer_id) == (
        250_000,
        False,
        "cus_acme",
    )
