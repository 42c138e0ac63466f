"""Usage API: aggregates by day, bot or key; the CSV export; the invoice endpoint; bad input."""

from __future__ import annotations

import csv
import io
from datetime import date, timedelta

import pytest
from django.test import Client

from billing import apis, selectors
from billing.budgets import current_month, month_bounds
from billing.models import Plan, UsageDaily
from tenants.models import ApiKey, Tenant
from tests.factories import bearer, make_api_key

pytestmark = pytest.mark.django_db

OCTOBER_1 = date(2026, 10, 1)
OCTOBER_2 = date(2026, 10, 2)


@pytest.fixture(autouse=True)
def _billing_urls(settings):
    settings.ROOT_URLCONF = "tests.billing.urls"
    settings.PUBLIC_SCHEMA_URLCONF = "tests.billing.urls"


@pytest.fixture
def admin_key(tenant_pair) -> str:
    return make_api_key(tenant_pair.a, scopes=[ApiKey.Scope.ADMIN])[1]


def daily(tenant, day: date, bot: str, api_key_id: int, *, tokens_in: int, tokens_out: int = 0, **counters):
    return UsageDaily.objects.create(
        tenant=tenant,
        day=day,
        bot=bot,
        api_key_id=api_key_id,
        requests=counters.pop("requests", 1),
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        **counters,
    )


@pytest.fixture
def october(tenant_pair):
    acme, globex = tenant_pair.a, tenant_pair.b
    daily(acme, OCTOBER_1, "bot_alpha", 7, tokens_in=100, tokens_out=10, requests=2)
    daily(acme, OCTOBER_1, "bot_beta", 0, tokens_in=50, tokens_out=5, requests=3, cached_requests=1, cached_tokens=20)
    daily(acme, OCTOBER_2, "bot_alpha", 7, tokens_in=30, tokens_out=3)
    daily(acme, date(2026, 11, 1), "bot_alpha", 7, tokens_in=9_999)  # outside the range asked for
    daily(globex, OCTOBER_1, "bot_alpha", 7, tokens_in=5_000)  # another tenant
    return acme


def counters(requests, cached_requests, tokens_in, tokens_out, cached_tokens) -> dict[str, int]:
    return {
        "requests": requests,
        "cached_requests": cached_requests,
        "tokens_in": tokens_in,
        "tokens_out": tokens_out,
        "cached_tokens": cached_tokens,
        "billable_tokens": tokens_in + tokens_out - cached_tokens,
    }


OCTOBER_TOTAL = counters(6, 1, 180, 18, 20)


def get_usage(client: Client, key: str, **params):
    return client.get("/api/v1/usage/", params, **bearer(key))


def test_usage_by_day(client, october, admin_key):
    response = get_usage(client, admin_key, **{"from": "2026-10-01", "to": "2026-10-31", "group_by": "day"})

    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "from": "2026-10-01",
        "to": "2026-10-31",
        "group_by": "day",
        "data": [
            {"day": "2026-10-01", **counters(5, 1, 150, 15, 20)},
            {"day": "2026-10-02", **counters(1, 0, 30, 3, 0)},
        ],
        "total": OCTOBER_TOTAL,
    }


def test_usage_by_bot(client, october, admin_key):
    response = get_usage(client, admin_key, **{"from": "2026-10-01", "to": "2026-10-31", "group_by": "bot"})

    assert response.json()["data"] == [
        {"bot": "bot_alpha", **counters(3, 0, 130, 13, 0)},
        {"bot": "bot_beta", **counters(3, 1, 50, 5, 20)},
    ]
    assert response.json()["total"] == OCTOBER_TOTAL


def test_usage_by_key_names_keyless_usage_null(client, october, admin_key):
    response = get_usage(client, admin_key, **{"from": "2026-10-01", "to": "2026-10-31", "group_by": "key"})

    assert response.json()["data"] == [
        {"api_key_id": None, **counters(3, 1, 50, 5, 20)},
        {"api_key_id": 7, **counters(3, 0, 130, 13, 0)},
    ]


def test_usage_defaults_to_this_month_by_day(client, tenant_pair, admin_key):
    today = selectors.today()
    daily(tenant_pair.a, today, "bot_alpha", 0, tokens_in=11)
    daily(tenant_pair.a, month_bounds(current_month())[0] - timedelta(days=1), "bot_alpha", 0, tokens_in=99)

    body = get_usage(client, admin_key).json()

    assert (body["from"], body["to"], body["group_by"]) == (today.replace(day=1).isoformat(), today.isoformat(), "day")
    assert body["data"] == [{"day": today.isoformat(), **counters(1, 0, 11, 0, 0)}]


def test_a_range_given_only_its_end_starts_on_that_months_first_day(client, october, admin_key):
    body = get_usage(client, admin_key, to="2026-10-01").json()

    assert (body["from"], body["to"], body["total"]) == ("2026-10-01", "2026-10-01", counters(5, 1, 150, 15, 20))


def test_an_empty_range_has_zero_totals(client, tenant_pair, admin_key):
    body = get_usage(client, admin_key, **{"from": "2020-01-01", "to": "2020-01-31"}).json()

    assert (body["data"], body["total"]) == ([], counters(0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("params", "param", "message"),
    [
        pytest.param({"from": "2026-13-01"}, "from", "Date has wrong format", id="impossible_date_case"),
        pytest.param({"from": "20261001"}, "from", "Date has wrong format", id="compact_date_case"),
        pytest.param({"from": "2026-10-01T00:00"}, "from", "Date has wrong format", id="datetime_case"),
        pytest.param(
            {"from": "2026-10-02", "to": "2026-10-01"}, "to", "'to' must not be before 'from'.", id="reversed_case"
        ),
        pytest.param({"from": "2025-01-01", "to": "2026-01-02"}, "to", "at most 366 days", id="too_long_case"),
        pytest.param({"group_by": "week"}, "group_by", '"week" is not a valid choice.', id="bad_group_case"),
        pytest.param({"tenant": "globex"}, "tenant", "Unknown field.", id="unknown_param_case"),
    ],
)
def test_bad_usage_queries_are_400_naming_the_parameter(client, tenant_pair, admin_key, params, param, message):
    response = get_usage(client, admin_key, **params)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request", param)
    assert message in error["message"]


def test_usage_needs_the_admin_scope(client, tenant_pair):
    chat_key = make_api_key(tenant_pair.a, scopes=[ApiKey.Scope.CHAT])[1]

    response = get_usage(client, chat_key)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


def test_usage_without_credentials_is_401_on_the_bare_domain(client, tenant_pair):
    response = client.get("/api/v1/usage/")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_credentials"


def test_usage_summary_costs_two_queries(tenant_pair, october, django_assert_num_queries):
    with django_assert_num_queries(2):
        selectors.usage_summary(tenant=october, date_from=OCTOBER_1, date_to=date(2026, 10, 31), group_by="bot")


# --- CSV ----------------------------------------------------------------------------------------


def read_csv(response) -> list[list[str]]:
    # The test client is synchronous; under ASGI the async body streams as it is produced.
    with pytest.warns(Warning, match="must consume asynchronous iterators"):
        body = b"".join(response)
    return list(csv.reader(io.StringIO(body.decode())))


HEADER = ["day", "bot", "api_key_id", *selectors.COUNTERS, "billable_tokens"]


def test_csv_export_streams_the_daily_rows(client, october, admin_key):
    response = client.get("/api/v1/usage/export.csv", {"from": "2026-10-01", "to": "2026-10-31"}, **bearer(admin_key))

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="usage-acme-2026-10-01-2026-10-31.csv"'
    assert read_csv(response) == [
        HEADER,
        ["2026-10-01", "bot_alpha", "7", "2", "0", "100", "10", "0", "110"],
        ["2026-10-01", "bot_beta", "", "3", "1", "50", "5", "20", "35"],
        ["2026-10-02", "bot_alpha", "7", "1", "0", "30", "3", "0", "33"],
    ]


def test_csv_export_pages_through_every_row(client, tenant_pair, admin_key, monkeypatch):
    monkeypatch.setattr(apis, "CSV_PAGE_ROWS", 2)
    for number in range(5):
        daily(tenant_pair.a, OCTOBER_1, f"bot_{number}", number, tokens_in=number)

    response = client.get("/api/v1/usage/export.csv", {"from": "2026-10-01", "to": "2026-10-01"}, **bearer(admin_key))

    rows = read_csv(response)
    assert [row[1] for row in rows[1:]] == ["bot_0", "bot_1", "bot_2", "bot_3", "bot_4"]


def test_csv_cells_that_look_like_formulas_are_neutralised(client, tenant_pair, admin_key):
    daily(tenant_pair.a, OCTOBER_1, "=HYPERLINK(1)", 0, tokens_in=1)

    response = client.get("/api/v1/usage/export.csv", {"from": "2026-10-01", "to": "2026-10-01"}, **bearer(admin_key))

    assert read_csv(response)[1][1] == "'=HYPERLINK(1)"


def test_csv_errors_are_json_even_when_csv_is_accepted(client, tenant_pair, admin_key):
    response = client.get(
        "/api/v1/usage/export.csv",
        {"from": "2026-10-02", "to": "2026-10-01"},
        HTTP_ACCEPT="text/csv",
        **bearer(admin_key),
    )

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["param"] == "to"


def test_csv_export_needs_the_admin_scope(client, tenant_pair):
    chat_key = make_api_key(tenant_pair.a, scopes=[ApiKey.Scope.CHAT])[1]

    response = client.get("/api/v1/usage/export.csv", **bearer(chat_key))

    assert response.status_code == 403


# --- invoice ------------------------------------------------------------------------------------


def test_invoice_endpoint_computes_the_month_from_the_current_plan(client, october, admin_key):
    plan = Plan.objects.create(
        code="tiny-test", name="Tiny", included_tokens_per_month=100, price_per_1k_extra_tokens="2.5000"
    )
    Tenant.objects.filter(pk=october.pk).update(plan=plan)

    response = client.get("/api/v1/usage/invoice/", {"month": "2026-10"}, **bearer(admin_key))

    assert response.status_code == 200
    assert response.json() == {
        "object": "invoice",
        "month": "2026-10",
        "status": "draft",
        "plan": {"code": "tiny-test", "name": "Tiny"},
        "included_tokens": 100,
        "used_tokens": 178,
        "overage_tokens": 78,
        "price_per_1k_extra_tokens": "2.5000",
        "amount": "0.20",  # 78 * 2.5 / 1000 = 0.195, half up
        "issued_at": None,
        "lines": [
            {"bot": "bot_alpha", **counters(3, 0, 130, 13, 0)},
            {"bot": "bot_beta", **counters(3, 1, 50, 5, 20)},
        ],
    }


def test_invoice_defaults_to_this_month(client, tenant_pair, admin_key):
    body = client.get("/api/v1/usage/invoice/", **bearer(admin_key)).json()

    assert (body["month"], body["used_tokens"], body["amount"]) == (current_month(), 0, "0.00")


@pytest.mark.parametrize(
    ("month", "message"),
    [
        pytest.param("2026-13", "month: Use the format YYYY-MM.", id="bad_month_case"),
        pytest.param("2026-1", "month: Use the format YYYY-MM.", id="short_month_case"),
        pytest.param("1999-12", "month: Use the format YYYY-MM.", id="ancient_case"),
        pytest.param("2999-01", "month: The month must not be in the future.", id="future_case"),
    ],
)
def test_bad_invoice_months_are_400(client, tenant_pair, admin_key, month, message):
    response = client.get("/api/v1/usage/invoice/", {"month": month}, **bearer(admin_key))

    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": message,
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": "month",
    }
