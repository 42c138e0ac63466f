"""Token budgets: limits from plan and settings, atomic reserve/settle, alerts, Redis loss, races."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import UTC, date, datetime, timedelta

import pytest
import redis
from asgiref.sync import async_to_sync
from django.db import connection

from billing import budgets
from billing.budgets import (
    BudgetExceeded,
    BudgetLimit,
    BudgetUnavailable,
    Reservation,
    budget_counters_key,
    budget_limits_for,
    budget_reservations_expire,
    budget_reserve,
    budget_reserve_async,
    budget_settle,
    budget_settle_async,
    budget_used,
    current_month,
    month_bounds,
)
from billing.models import ApiKeyBudget, BudgetAlert, Plan, TenantBilling, UsageDaily, UsageRecord
from billing.services import api_key_budget_set, tenant_billing_update, tenant_plan_change
from tenants.errors import error_response
from tenants.models import Tenant
from tenants.redis import get_async_redis, get_redis
from tests.factories import make_api_key


def tenant_limit(tenant, tokens: int, *, is_hard: bool = True) -> BudgetLimit:
    return BudgetLimit("tenant", tenant.schema_name, tokens, is_hard)


def used(tenant, level: str = "tenant", identity: str | None = None) -> int | None:
    return budget_used(tenant_schema=tenant.schema_name, level=level, identity=identity or tenant.schema_name)


def renewal_day() -> str:
    return month_bounds(current_month())[1].isoformat()


def this_month_day() -> date:
    return month_bounds(current_month())[0]


def record_daily(tenant, *, tokens_in: int, tokens_out: int = 0, cached_tokens: int = 0, api_key_id: int = 0, **extra):
    return UsageDaily.objects.create(
        tenant=tenant,
        day=extra.pop("day", this_month_day()),
        bot=extra.pop("bot", "bot_alpha"),
        api_key_id=api_key_id,
        requests=1,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        cached_tokens=cached_tokens,
        **extra,
    )


# --- limits -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_tenant_without_plan_or_settings_gets_the_default_plan_as_a_hard_budget(tenant_pair):
    Tenant.objects.filter(pk=tenant_pair.a.pk).update(plan=None)

    limits = budget_limits_for(tenant=tenant_pair.a, api_key_id=None, end_user="visitor:abc")

    assert limits == [BudgetLimit("tenant", tenant_pair.a.schema_name, 1_000_000, True)]


@pytest.mark.django_db
def test_limits_come_from_plan_tenant_settings_and_key_budget_in_one_query(tenant_pair, django_assert_num_queries):
    acme = tenant_pair.a
    plan = Plan.objects.create(code="pro-test", name="Pro", included_tokens_per_month=5_000_000)
    tenant_plan_change(tenant=Tenant.objects.get(pk=acme.pk), plan=plan)
    tenant_billing_update(
        tenant=acme, monthly_token_budget=2_000_000, is_budget_hard=False, end_user_monthly_tokens=10_000
    )
    key, _raw = make_api_key(acme)
    api_key_budget_set(api_key=key, monthly_token_budget=50_000)

    with django_assert_num_queries(1):
        limits = budget_limits_for(tenant=acme, api_key_id=key.pk, end_user=f"key:{key.pk}:alice")

    assert limits == [
        BudgetLimit("tenant", acme.schema_name, 2_000_000, False),
        BudgetLimit("key", str(key.pk), 50_000, True),
        BudgetLimit("end_user", f"key:{key.pk}:alice", 10_000, True),
    ]


@pytest.mark.django_db
def test_a_plan_change_takes_effect_on_the_next_request(tenant_pair):
    acme = tenant_pair.a
    small = Plan.objects.create(code="small-test", name="Small", included_tokens_per_month=1_000)
    large = Plan.objects.create(code="large-test", name="Large", included_tokens_per_month=9_000)
    tenant_plan_change(tenant=Tenant.objects.get(pk=acme.pk), plan=small)
    assert budget_limits_for(tenant=acme, api_key_id=None, end_user="")[0].monthly_tokens == 1_000

    tenant_plan_change(tenant=Tenant.objects.get(pk=acme.pk), plan=large)

    # The caller's tenant object is the stale, cached one: the plan is read live regardless.
    assert budget_limits_for(tenant=tenant_pair.a, api_key_id=None, end_user="")[0].monthly_tokens == 9_000


@pytest.mark.django_db
def test_another_tenants_key_budget_is_never_applied(tenant_pair):
    globex_key, _raw = make_api_key(tenant_pair.b)
    ApiKeyBudget.objects.create(api_key=globex_key, monthly_token_budget=5)

    limits = budget_limits_for(tenant=tenant_pair.a, api_key_id=globex_key.pk, end_user="")

    assert [limit.level for limit in limits] == ["tenant"]


@pytest.mark.django_db
def test_no_end_user_budget_without_an_end_user(tenant_pair):
    tenant_billing_update(tenant=tenant_pair.a, end_user_monthly_tokens=10)

    limits = budget_limits_for(tenant=tenant_pair.a, api_key_id=None, end_user="")

    assert [limit.level for limit in limits] == ["tenant"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("changes", "param"),
    [
        pytest.param({"monthly_token_budget": -1}, "monthly_token_budget", id="negative_budget_case"),
        pytest.param({"end_user_monthly_tokens": "many"}, "end_user_monthly_tokens", id="not_a_number_case"),
        pytest.param({"plan": "pro"}, "plan", id="unknown_field_case"),
    ],
)
def test_bad_billing_settings_are_refused_and_nothing_changes(tenant_pair, changes, param):
    from tenants.errors import ValidationFailed

    tenant_billing_update(tenant=tenant_pair.a, monthly_token_budget=500)

    with pytest.raises(ValidationFailed) as caught:
        tenant_billing_update(tenant=tenant_pair.a, **changes)

    assert caught.value.param == param
    billing = TenantBilling.objects.get(tenant=tenant_pair.a)
    assert (billing.monthly_token_budget, billing.end_user_monthly_tokens) == (500, None)


# --- reserve ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_reservation_is_added_to_every_level(tenant_pair):
    acme = tenant_pair.a
    limits = [
        tenant_limit(acme, 1_000),
        BudgetLimit("key", "7", 500, True),
        BudgetLimit("end_user", "visitor:a", 300, True),
    ]

    reservation = budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=120, reservation_id="r-1")

    assert reservation == Reservation(
        reservation_id="r-1",
        tenant_schema=acme.schema_name,
        month=current_month(),
        levels=[("tenant", acme.schema_name), ("key", "7"), ("end_user", "visitor:a")],
        tokens=120,
    )
    assert (used(acme), used(acme, "key", "7"), used(acme, "end_user", "visitor:a")) == (120, 120, 120)
    assert 39 * 86_400 < get_redis().ttl(budget_counters_key(acme.schema_name, current_month())) <= 40 * 86_400


@pytest.mark.django_db
def test_over_a_hard_tenant_budget_is_refused_with_402_and_nothing_is_reserved(tenant_pair):
    acme = tenant_pair.a
    record_daily(acme, tokens_in=1_000_000)
    limits = [tenant_limit(acme, 1_000_000), BudgetLimit("key", "7", 5_000, True)]

    with pytest.raises(BudgetExceeded) as caught:
        budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=10, reservation_id="r-1")

    error = caught.value
    assert error.message == (
        f"This tenant's monthly token budget (1,000,000) is used up; it renews on {renewal_day()}."
    )
    assert (error.level, error.identity, error.monthly_tokens, error.used_tokens) == (
        "tenant",
        acme.schema_name,
        1_000_000,
        1_000_000,
    )
    assert (used(acme), used(acme, "key", "7")) == (1_000_000, 0)
    assert get_redis().zcard(budgets._pending_key(acme.schema_name)) == 0
    response = error_response(error)
    assert response.status_code == 402
    assert json.loads(response.content) == {
        "error": {"message": error.message, "type": "insufficient_quota", "code": "budget_exceeded", "param": None}
    }


@pytest.mark.django_db
def test_a_level_that_cannot_fit_the_estimate_names_what_is_left(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 10_000), BudgetLimit("key", "7", 1_000, True)]
    budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=800, reservation_id="r-1")

    with pytest.raises(BudgetExceeded) as caught:
        budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=201, reservation_id="r-2")

    assert caught.value.message == (
        "This API key's monthly token budget (1,000) has 200 tokens left, fewer than this request may use (201); "
        f"it renews on {renewal_day()}."
    )
    # All or nothing: the tenant level, which had room, did not keep the refused estimate.
    assert (used(acme), used(acme, "key", "7")) == (800, 800)


@pytest.mark.django_db
def test_an_end_user_over_budget_is_refused_while_others_are_served(tenant_pair):
    acme = tenant_pair.a

    def limits(end_user):
        return [tenant_limit(acme, 10_000), BudgetLimit("end_user", end_user, 100, True)]

    budget_reserve(tenant_schema=acme.schema_name, limits=limits("visitor:a"), tokens=100, reservation_id="r-1")

    with pytest.raises(BudgetExceeded, match=r"^This end user's monthly token budget \(100\) is used up"):
        budget_reserve(tenant_schema=acme.schema_name, limits=limits("visitor:a"), tokens=1, reservation_id="r-2")
    budget_reserve(tenant_schema=acme.schema_name, limits=limits("visitor:b"), tokens=100, reservation_id="r-3")

    assert used(acme) == 200


@pytest.mark.django_db
def test_a_soft_budget_never_refuses_and_alerts_once_per_threshold(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 1_000, is_hard=False)]

    for number, tokens in enumerate([700, 150, 100, 100, 500]):
        budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=tokens, reservation_id=f"r-{number}")

    assert used(acme) == 1_550
    assert list(
        BudgetAlert.objects.filter(tenant=acme)
        .order_by("threshold_percent")
        .values_list("month", "level", "identity", "threshold_percent", "used_tokens", "monthly_tokens", "is_hard")
    ) == [
        (current_month(), "tenant", acme.schema_name, 80, 850, 1_000, False),
        (current_month(), "tenant", acme.schema_name, 100, 1_050, 1_000, False),
    ]


@pytest.mark.django_db
def test_alerts_are_not_stored_twice_after_redis_loses_its_flags(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 1_000, is_hard=False)]
    budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=900, reservation_id="r-1")
    get_redis().flushdb()

    budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=900, reservation_id="r-2")

    assert list(BudgetAlert.objects.filter(tenant=acme).values_list("threshold_percent", "used_tokens")) == [(80, 900)]


@pytest.mark.django_db
def test_a_hard_level_alerts_at_80_percent(tenant_pair):
    acme = tenant_pair.a

    budget_reserve(tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 100)], tokens=80, reservation_id="r-1")

    assert list(BudgetAlert.objects.values_list("level", "threshold_percent", "is_hard")) == [("tenant", 80, True)]


@pytest.mark.django_db
def test_repeating_a_reservation_id_reserves_once(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 1_000)]
    first = budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=300, reservation_id="r-1")

    again = budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=300, reservation_id="r-1")

    assert again == first
    assert used(acme) == 300


@pytest.mark.django_db
def test_no_limits_reserves_nothing(tenant_pair):
    reservation = budget_reserve(tenant_schema=tenant_pair.a.schema_name, limits=[], tokens=50, reservation_id="r-1")
    budget_settle(reservation=reservation, actual_tokens=70)

    assert reservation.levels == []
    assert get_redis().dbsize() == 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("tokens", "reservation_id", "limits", "message"),
    [
        pytest.param(-1, "r-1", "one", "cannot be negative", id="negative_estimate_case"),
        pytest.param(1, "", "one", "reservation_id", id="empty_id_case"),
        pytest.param(1, "r-1", "twice", "once", id="duplicate_level_case"),
    ],
)
def test_bad_reservations_are_refused_before_touching_redis(tenant_pair, tokens, reservation_id, limits, message):
    limit = tenant_limit(tenant_pair.a, 100)

    with pytest.raises(ValueError, match=message):
        budget_reserve(
            tenant_schema=tenant_pair.a.schema_name,
            limits=[limit] if limits == "one" else [limit, limit],
            tokens=tokens,
            reservation_id=reservation_id,
        )

    assert get_redis().dbsize() == 0


@pytest.mark.django_db
def test_redis_down_is_a_503_not_a_free_pass(tenant_pair, monkeypatch):
    monkeypatch.setattr(budgets, "get_redis", lambda: redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2))

    with pytest.raises(BudgetUnavailable) as caught:
        budget_reserve(
            tenant_schema=tenant_pair.a.schema_name,
            limits=[tenant_limit(tenant_pair.a, 100)],
            tokens=1,
            reservation_id="r",
        )

    assert (caught.value.status_code, caught.value.code) == (503, "budget_unavailable")


# --- counters initialised from PostgreSQL -------------------------------------------------------


@pytest.mark.django_db
def test_a_lost_counter_is_rebuilt_from_this_months_recorded_usage(tenant_pair):
    acme = tenant_pair.a
    record_daily(acme, tokens_in=500, tokens_out=150, cached_tokens=50, api_key_id=7)  # 600 billable
    record_daily(acme, tokens_in=40, bot="bot_beta")
    record_daily(acme, tokens_in=9_999, day=this_month_day() - timedelta(days=1))  # last month
    record_daily(tenant_pair.b, tokens_in=9_999)
    start = datetime.combine(this_month_day(), datetime.min.time(), tzinfo=UTC)
    for number, (end_user, tokens, cached) in enumerate([("visitor:a", 30, False), ("visitor:a", 500, True)]):
        UsageRecord.objects.create(
            event_id=f"e-{number}", tenant=acme, occurred_at=start, end_user=end_user, tokens_in=tokens, cached=cached
        )
    limits = [
        tenant_limit(acme, 1_000),
        BudgetLimit("key", "7", 5_000, True),
        BudgetLimit("end_user", "visitor:a", 50, True),
    ]

    budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=20, reservation_id="r-1")

    assert (used(acme), used(acme, "key", "7"), used(acme, "end_user", "visitor:a")) == (660, 620, 50)
    with pytest.raises(BudgetExceeded, match="end user"):
        budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=1, reservation_id="r-2")


@pytest.mark.django_db
def test_a_redis_restart_does_not_hand_out_a_new_budget(tenant_pair):
    acme = tenant_pair.a
    record_daily(acme, tokens_in=990)
    budget_reserve(tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=10, reservation_id="r-1")
    get_redis().flushdb()

    with pytest.raises(BudgetExceeded):
        budget_reserve(
            tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=11, reservation_id="r-2"
        )

    assert used(acme) == 990


# --- settle -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_settling_replaces_the_estimate_with_real_usage_once(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 1_000), BudgetLimit("key", "7", 1_000, True)]
    reservation = budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=500, reservation_id="r-1")

    budget_settle(reservation=reservation, actual_tokens=120)
    budget_settle(reservation=reservation, actual_tokens=120)
    budget_settle(reservation=reservation, actual_tokens=300)

    assert (used(acme), used(acme, "key", "7")) == (120, 120)
    assert get_redis().zcard(budgets._pending_key(acme.schema_name)) == 0


@pytest.mark.django_db
def test_settling_more_than_reserved_counts_it_and_alerts(tenant_pair):
    acme = tenant_pair.a
    reservation = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 500)], tokens=100, reservation_id="r-1"
    )

    budget_settle(reservation=reservation, actual_tokens=450)

    assert used(acme) == 450
    assert list(BudgetAlert.objects.values_list("threshold_percent", "used_tokens")) == [(80, 450)]


@pytest.mark.django_db
def test_a_settlement_queued_on_a_pipeline_counts_and_alerts_like_a_direct_one(tenant_pair):
    """The generation worker settles in its end-of-turn pipeline (chat.engine._finish)."""
    acme = tenant_pair.a
    reservation = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 500)], tokens=100, reservation_id="r-q"
    )

    async def settle_in_a_pipeline() -> None:
        client = get_async_redis()
        async with client.pipeline(transaction=False) as pipe:
            pipe.set("unrelated", 1)
            assert budgets.budget_settle_queue(pipe, reservation=reservation, actual_tokens=450)
            results = await pipe.execute(raise_on_error=False)
        await budgets.budget_settle_finish(reservation=reservation, result=results[1])
        await client.aclose()

    async_to_sync(settle_in_a_pipeline)()
    async_to_sync(settle_in_a_pipeline)()  # at least once: the second changes nothing

    assert used(acme) == 450
    assert list(BudgetAlert.objects.values_list("threshold_percent", "used_tokens")) == [(80, 450)]


@pytest.mark.django_db
def test_a_reservation_whose_worker_died_is_released_and_a_late_settle_still_counts(tenant_pair):
    acme = tenant_pair.a
    reservation = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=400, reservation_id="r-1"
    )
    fresh = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=5, reservation_id="r-2"
    )

    assert budget_reservations_expire(tenant_schemas=[acme.schema_name, "no_such_tenant"], older_than_seconds=3600) == 0
    assert budget_reservations_expire(tenant_schemas=[acme.schema_name], older_than_seconds=-1) == 2
    assert used(acme) == 0
    budget_settle(reservation=reservation, actual_tokens=90)
    budget_settle(reservation=fresh, actual_tokens=5)

    assert used(acme) == 95
    assert budget_reservations_expire(tenant_schemas=[acme.schema_name], older_than_seconds=-1) == 0


@pytest.mark.django_db
def test_settling_a_reservation_redis_forgot_never_creates_a_partial_counter(tenant_pair):
    acme = tenant_pair.a
    reservation = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=100, reservation_id="r-1"
    )
    get_redis().flushdb()

    budget_settle(reservation=reservation, actual_tokens=80)

    assert used(acme) is None  # the next reserve rebuilds it from PostgreSQL
    budget_settle(reservation=reservation, actual_tokens=80)
    assert used(acme) is None


@pytest.mark.django_db
def test_settling_with_a_negative_count_is_refused(tenant_pair):
    acme = tenant_pair.a
    reservation = budget_reserve(
        tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=100, reservation_id="r-1"
    )

    with pytest.raises(ValueError, match="actual_tokens"):
        budget_settle(reservation=reservation, actual_tokens=-5)

    assert used(acme) == 100


def test_a_reservation_survives_the_trip_from_web_edge_to_worker():
    reservation = Reservation(
        reservation_id="r-1", tenant_schema="acme", month="2026-11", levels=[("tenant", "acme"), ("key", "7")], tokens=9
    )

    assert Reservation.from_dict(json.loads(json.dumps(reservation.to_dict()))) == reservation


def test_month_bounds_roll_over_the_year():
    assert month_bounds("2026-12") == (date(2026, 12, 1), date(2027, 1, 1))
    assert month_bounds("2026-02") == (date(2026, 2, 1), date(2026, 3, 1))


# --- concurrency --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_async_reservations_race_for_the_last_tokens_of_a_key(tenant_pair):
    acme = tenant_pair.a
    limits = [tenant_limit(acme, 100_000), BudgetLimit("key", "7", 300, True)]

    async def race() -> list[bool]:
        async def one(number: int) -> bool:
            try:
                await budget_reserve_async(
                    tenant_schema=acme.schema_name, limits=limits, tokens=10, reservation_id=f"r-{number}"
                )
            except BudgetExceeded:
                return False
            return True

        return await asyncio.gather(*(one(number) for number in range(60)))

    admitted = async_to_sync(race)()

    assert admitted.count(True) == 30
    assert (used(acme), used(acme, "key", "7")) == (300, 300)


@pytest.mark.django_db
def test_async_settle_is_idempotent(tenant_pair):
    acme = tenant_pair.a

    async def reserve_and_settle_twice() -> None:
        reservation = await budget_reserve_async(
            tenant_schema=acme.schema_name, limits=[tenant_limit(acme, 1_000)], tokens=500, reservation_id="r-1"
        )
        await budget_settle_async(reservation=reservation, actual_tokens=42)
        await budget_settle_async(reservation=reservation, actual_tokens=42)

    async_to_sync(reserve_and_settle_twice)()

    assert used(acme) == 42


CONCURRENCY_BOT = "bot_budget_concurrency"


@pytest.fixture
def nearly_exhausted(django_db_blocker, tenant_pair):
    """Committed usage leaving room for exactly ten 10-token reservations of a 1,000 budget."""
    with django_db_blocker.unblock():
        UsageDaily.objects.filter(bot=CONCURRENCY_BOT).delete()
        BudgetAlert.objects.filter(tenant=tenant_pair.a).delete()
        record_daily(tenant_pair.a, tokens_in=900, bot=CONCURRENCY_BOT)
        yield tenant_pair.a
        UsageDaily.objects.filter(bot=CONCURRENCY_BOT).delete()
        BudgetAlert.objects.filter(tenant=tenant_pair.a).delete()  # the 100% crossing


def test_fifty_threads_against_a_nearly_exhausted_budget_admit_exactly_ten(nearly_exhausted):
    acme = nearly_exhausted
    limits = [tenant_limit(acme, 1_000)]
    start = threading.Barrier(50)
    outcomes: list[str] = []

    def reserve(number: int) -> None:
        try:
            start.wait()
            budget_reserve(tenant_schema=acme.schema_name, limits=limits, tokens=10, reservation_id=f"r-{number}")
            outcomes.append("admitted")
        except BudgetExceeded:
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [threading.Thread(target=reserve, args=(number,)) for number in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert (outcomes.count("admitted"), outcomes.count("refused")) == (10, 40)
    # Every thread found the counter missing and raced to initialise it from PostgreSQL (900).
    assert used(acme) == 1_000
    assert list(BudgetAlert.objects.filter(tenant=acme).values_list("threshold_percent", "used_tokens")) == [
        (100, 1_000)
    ]


@pytest.mark.django_db
def test_the_beat_task_releases_stale_reservations_of_every_tenant(tenant_pair, settings):
    from billing.tasks import budget_reservations_expire_task

    for tenant in (tenant_pair.a, tenant_pair.b):
        budget_reserve(
            tenant_schema=tenant.schema_name, limits=[tenant_limit(tenant, 100)], tokens=7, reservation_id="r"
        )
    settings.BILLING_RESERVATION_STALE_SECONDS = -1

    assert budget_reservations_expire_task() == 2
    assert (used(tenant_pair.a), used(tenant_pair.b)) == (0, 0)
