"""Admin site: the dashboard (charts over 7/30/90 days, aggregates in a fixed number of queries),
layout, the tenant switcher, and who may see what."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone
from django_tenants.utils import tenant_context

from chat.models import Conversation, Message
from chat.selectors import dashboard_stats
from chat.services import bot_create, conversation_create
from tenants.services import membership_set
from tests.factories import make_member
from tests.site import BASE_QUERIES, captured_queries, site_client

pytestmark = pytest.mark.django_db


def _traffic(*, days_ago: int, answers: int, ttft_ms: float, cached: int = 0, errors: int = 0) -> None:
    bot = bot_create(name=f"Bot {days_ago}")
    moment = timezone.now() - timedelta(days=days_ago)
    conversation = conversation_create(bot=bot, end_user_kind="visitor", end_user_id="v1")
    Conversation.objects.filter(pk=conversation.pk).update(created_at=moment)
    for index in range(answers):
        Message.objects.create(conversation=conversation, role="user", content="q", created_at=moment)
        Message.objects.create(
            conversation=conversation,
            role="assistant",
            content="a",
            created_at=moment,
            tokens_in=10,
            tokens_out=5,
            ttft_ms=ttft_ms * (index + 1),
            is_cached=index < cached,
            finish_reason="error" if index >= answers - errors else "stop",
        )


def test_dashboard_stats_aggregate_per_day_in_three_queries(tenant_pair):
    today = datetime.now(tz=UTC).date()
    with tenant_context(tenant_pair.a):
        _traffic(days_ago=0, answers=4, ttft_ms=100, cached=1, errors=1)
        _traffic(days_ago=2, answers=2, ttft_ms=50)
        _traffic(days_ago=20, answers=3, ttft_ms=10)  # outside a 7-day window
        with captured_queries() as queries:
            stats = dashboard_stats(date_from=today - timedelta(days=6), date_to=today)
        query_count = len(queries)

    assert query_count == 3
    assert [row["day"] for row in stats.days] == [today - timedelta(days=offset) for offset in range(6, -1, -1)]
    last = stats.days[-1]
    assert (last["conversations"], last["messages"], last["answers"]) == (1, 8, 4)
    assert (last["tokens_in"], last["tokens_out"], last["cached"], last["errors"]) == (40, 20, 1, 1)
    # TTFT over answers the model produced (the cached one left out): 200, 300, 400 ms.
    assert last["ttft_p50"] == 300.0
    assert last["ttft_p95"] == pytest.approx(390.0)
    assert stats.days[-3]["messages"] == 4
    assert stats.days[0]["messages"] == 0
    assert stats.totals["conversations"] == 2
    assert stats.totals["messages"] == 12
    assert stats.totals["cache_hit_rate"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("days", [7, 30, 90], ids=["week_case", "month_case", "quarter_case"])
def test_dashboard_renders_charts_for_each_period_with_pinned_queries(tenant_pair, days):
    with tenant_context(tenant_pair.a):
        _traffic(days_ago=1, answers=2, ttft_ms=80)
    client = site_client(tenant_pair.a, tenant_pair.owner_a)
    client.get("/")

    with captured_queries() as queries:
        response = client.get(f"/?days={days}")
    query_count = len(queries)

    html = response.content.decode()
    assert response.status_code == 200
    assert query_count == BASE_QUERIES + 3
    assert html.count('<figure class="chart">') == 6
    assert html.count('role="img"') == 6
    for title in (
        "Conversations per day",
        "Messages per day",
        "Tokens per day",
        "Cache hit rate",
        "Time to first token",
    ):
        assert title in html
    assert f'href="?days={days}" aria-current="true"' in html


def test_dashboard_ignores_an_unknown_period(tenant_pair):
    response = site_client(tenant_pair.a, tenant_pair.owner_a).get("/?days=abc")

    assert response.status_code == 200
    assert 'href="?days=7" aria-current="true"' in response.content.decode()


def test_layout_has_landmarks_skip_link_and_tenant_switcher(tenant_pair):
    user = make_member(tenant_pair.a, role="admin")
    membership_set(user=user, tenant=tenant_pair.b, role="member")

    html = site_client(tenant_pair.a, user).get("/").content.decode()

    assert '<a class="skip-link" href="#main">Skip to content</a>' in html
    assert '<main class="content" id="main"' in html
    assert '<nav class="sidenav" aria-label="Admin sections">' in html
    assert 'href="http://acme.localhost/" aria-current="true">Acme' in html
    assert 'href="http://globex.localhost/">Globex' in html


def test_member_sees_dashboard_without_admin_sections(tenant_pair):
    member = make_member(tenant_pair.a, role="member")

    html = site_client(tenant_pair.a, member).get("/").content.decode()

    assert "Dashboard" in html
    assert 'href="/settings/api-keys/"' not in html
    assert 'href="/settings/members/"' not in html
    assert 'href="/usage/"' not in html


@pytest.mark.parametrize(
    "path",
    ["/", "/bots/", "/knowledge/", "/conversations/", "/settings/api-keys/", "/settings/members/", "/usage/"],
)
def test_every_page_renders_for_an_admin_and_sends_strangers_to_sign_in(tenant_pair, path):
    admin = make_member(tenant_pair.a, role="admin")

    page = site_client(tenant_pair.a, admin).get(path)
    anonymous = site_client(tenant_pair.a).get(path)
    outsider = site_client(tenant_pair.a, tenant_pair.owner_b).get(path)

    assert page.status_code == 200
    assert 'name="csrfmiddlewaretoken"' in page.content.decode()  # sign-out form at least
    for response in (anonymous, outsider):
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")


@pytest.mark.parametrize("path", ["/conversations/", "/settings/api-keys/", "/settings/members/", "/usage/"])
def test_member_is_refused_admin_pages(tenant_pair, path):
    member = make_member(tenant_pair.a, role="member")

    response = site_client(tenant_pair.a, member).get(path)

    assert response.status_code == 403
    assert "You can't do that here" in response.content.decode()


def test_admin_site_is_not_served_on_the_bare_domain(client, tenant_pair):
    client.force_login(tenant_pair.owner_a)

    assert client.get("/bots/").status_code == 404
