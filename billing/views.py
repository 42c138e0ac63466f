"""Admin-site page of the billing app: the plan, this month's usage against it, per-bot and
per-key breakdowns and the CSV export (billing's own export endpoint)."""

from __future__ import annotations

from django.http import HttpResponse
from django.shortcuts import render
from django.urls import reverse

from billing import selectors
from billing.budgets import current_month
from billing.labels import bot_labels
from tenants.selectors import api_key_list
from tenants.views import SiteRequest, site_page


@site_page(admin=True)
def usage(request: SiteRequest) -> HttpResponse:
    tenant = request.tenant
    date_to = selectors.today()
    date_from = date_to.replace(day=1)
    by_bot = selectors.usage_summary(
        tenant=tenant, date_from=date_from, date_to=date_to, group_by=selectors.GROUP_BY_BOT
    )
    by_key = selectors.usage_summary(
        tenant=tenant, date_from=date_from, date_to=date_to, group_by=selectors.GROUP_BY_KEY
    )
    invoice = selectors.invoice_compute(tenant=tenant, month=current_month())
    plan = selectors.tenant_plan(tenant=tenant)
    bot_names = bot_labels()
    key_names = {
        key.pk: f"{key.name} ({key.prefix})" for key in api_key_list(tenant=tenant).only("pk", "name", "prefix")
    }
    for row in by_bot["data"]:
        row["label"] = bot_names.get(row["bot"], row["bot"] or "(no bot)")
    for row in by_key["data"]:
        row["label"] = key_names.get(
            row["api_key_id"],
            "Widget and signed-in users" if not row["api_key_id"] else f"deleted key {row['api_key_id']}",
        )
    included = invoice.included_tokens
    used_percent = min(100, round(100 * invoice.used_tokens / included)) if included else 0
    export_url = f"{reverse('usage-export')}?from={date_from.isoformat()}&to={date_to.isoformat()}"
    return render(
        request,
        "site/usage.html",
        {
            "plan": plan,
            "invoice": invoice,
            "total": by_bot["total"],
            "by_bot": by_bot["data"],
            "by_key": by_key["data"],
            "used_percent": used_percent,
            "date_from": date_from,
            "date_to": date_to,
            "export_url": export_url,
            "nav": "usage",
        },
    )
