"""Reads: usage aggregates, CSV pages, a tenant's current plan and the invoice computation.

Every function takes the tenant resolved at the edge and filters by it; usage lives in the public
schema, so the active search_path plays no part here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db.models import Q, Sum

from billing.budgets import month_bounds
from billing.models import Invoice, Plan, UsageDaily

GROUP_BY_DAY = "day"
GROUP_BY_BOT = "bot"
GROUP_BY_KEY = "key"
GROUP_BY_CHOICES = (GROUP_BY_DAY, GROUP_BY_BOT, GROUP_BY_KEY)
_GROUP_COLUMN = {GROUP_BY_DAY: "day", GROUP_BY_BOT: "bot", GROUP_BY_KEY: "api_key_id"}
COUNTERS = ("requests", "cached_requests", "tokens_in", "tokens_out", "cached_tokens")
CSV_COLUMNS = ("day", "bot", "api_key_id", *COUNTERS, "billable_tokens")
CENT = Decimal("0.01")


def _sums() -> dict[str, Any]:
    return {name: Sum(name) for name in COUNTERS}


def _counters(row: Mapping[str, Any]) -> dict[str, int]:
    values = {name: int(row.get(name) or 0) for name in COUNTERS}
    values["billable_tokens"] = values["tokens_in"] + values["tokens_out"] - values["cached_tokens"]
    return values


def _daily(*, tenant, date_from: date, date_to: date):
    return UsageDaily.objects.filter(tenant_id=tenant.pk, day__gte=date_from, day__lte=date_to)


def usage_summary(*, tenant, date_from: date, date_to: date, group_by: str) -> dict[str, Any]:
    """Aggregates per day, bot or key over ``[date_from, date_to]`` (inclusive), and the total.

    Two queries, whatever the range.
    """
    column = _GROUP_COLUMN[group_by]
    daily = _daily(tenant=tenant, date_from=date_from, date_to=date_to)
    data = []
    for row in daily.values(column).annotate(**_sums()).order_by(column):
        item: dict[str, Any]
        if group_by == GROUP_BY_DAY:
            item = {"day": row["day"].isoformat()}
        elif group_by == GROUP_BY_BOT:
            item = {"bot": row["bot"]}
        else:
            item = {"api_key_id": row["api_key_id"] or None}
        item.update(_counters(row))
        data.append(item)
    return {"data": data, "total": _counters(daily.aggregate(**_sums()))}


def usage_daily_page(
    *, tenant, date_from: date, date_to: date, after: tuple[date, str, int] | None, limit: int
) -> list[dict[str, Any]]:
    """One page of daily rows in (day, bot, key) order, after the given row: keyset pagination on
    the unique index, so each page costs the same however deep into the export it is."""
    rows = _daily(tenant=tenant, date_from=date_from, date_to=date_to)
    if after is not None:
        day, bot, api_key_id = after
        rows = rows.filter(Q(day__gt=day) | Q(day=day, bot__gt=bot) | Q(day=day, bot=bot, api_key_id__gt=api_key_id))
    return list(rows.order_by("day", "bot", "api_key_id").values("day", "bot", "api_key_id", *COUNTERS)[:limit])


def tenant_plan(*, tenant) -> Plan:
    """The tenant's plan as stored now (not the cached tenant's): plan changes apply at once.
    A tenant without a plan gets the default plan's values."""
    from tenants.models import Tenant

    row = Tenant.objects.filter(pk=tenant.pk).select_related("plan").first()
    return (row.plan if row is not None else None) or Plan()


@dataclass(frozen=True, slots=True)
class InvoiceComputation:
    month: str
    plan_code: str
    plan_name: str
    included_tokens: int
    used_tokens: int
    overage_tokens: int
    price_per_1k_extra_tokens: Decimal
    amount: Decimal
    lines: list[dict[str, Any]] = field(default_factory=list)
    status: str = "draft"
    issued_at: datetime | None = None


def invoice_compute(*, tenant, month: str) -> InvoiceComputation:
    """The month's bill from the daily aggregates and the tenant's *current* plan.

    Billed tokens are input plus output tokens of requests not answered from the cache; those
    beyond the plan's included tokens cost the plan's price per 1,000 (pro rata), rounded to the
    cent, half up. Lines are per bot.
    """
    plan = tenant_plan(tenant=tenant)
    start, end = month_bounds(month)
    rows = (
        UsageDaily.objects.filter(tenant_id=tenant.pk, day__gte=start, day__lt=end)
        .values("bot")
        .annotate(**_sums())
        .order_by("bot")
    )
    lines: list[dict[str, Any]] = [{"bot": row["bot"], **_counters(row)} for row in rows]
    used = sum(line["billable_tokens"] for line in lines)
    included = plan.included_tokens_per_month
    overage = max(0, used - included)
    price = plan.price_per_1k_extra_tokens
    amount = (Decimal(overage) * price / 1000).quantize(CENT, rounding=ROUND_HALF_UP)
    return InvoiceComputation(
        month=month,
        plan_code=plan.code,
        plan_name=plan.name,
        included_tokens=included,
        used_tokens=used,
        overage_tokens=overage,
        price_per_1k_extra_tokens=price,
        amount=amount,
        lines=lines,
    )


def invoice_for_month(*, tenant, month: str) -> InvoiceComputation:
    """The issued invoice if there is one (frozen: later plan changes do not rewrite it), else
    the live computation (a draft)."""
    invoice = Invoice.objects.filter(tenant_id=tenant.pk, month=month).first()
    if invoice is None or invoice.status == Invoice.Status.DRAFT:
        return invoice_compute(tenant=tenant, month=month)
    plan = Plan.objects.filter(code=invoice.plan_code).first()
    return InvoiceComputation(
        month=invoice.month,
        plan_code=invoice.plan_code,
        plan_name=plan.name if plan is not None else invoice.plan_code,
        included_tokens=invoice.included_tokens,
        used_tokens=invoice.used_tokens,
        overage_tokens=invoice.overage_tokens,
        price_per_1k_extra_tokens=invoice.price_per_1k_extra_tokens,
        amount=invoice.amount,
        lines=invoice.lines,
        status=invoice.status,
        issued_at=invoice.issued_at,
    )


def months_ago(moment: datetime, count: int) -> str:
    """``YYYY-MM`` of the month ``count`` months before ``moment``'s."""
    index = moment.year * 12 + (moment.month - 1) - count
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def today() -> date:
    return datetime.now(tz=UTC).date()
