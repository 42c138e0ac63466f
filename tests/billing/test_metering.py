"""Usage metering: the stream on the hot path, batched idempotent writes, daily aggregates."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta, timezone

import pytest
import redis
from asgiref.sync import async_to_sync
from django.db import connection
from django.test import override_settings

from billing import metering
from billing.metering import USAGE_GROUP, UsageEvent, usage_flush, usage_record, usage_record_async, usage_write
from billing.models import UsageDaily, UsageRecord
from tenants.redis import get_redis

NOON = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAILY_FIELDS = ("day", "bot", "api_key_id", "requests", "cached_requests", "tokens_in", "tokens_out", "cached_tokens")


def make_event(tenant, event_id: str, **overrides) -> UsageEvent:
    values = {
        "event_id": event_id,
        "tenant_schema": tenant.schema_name,
        "bot": "bot_alpha",
        "api_key_id": 12,
        "end_user": "key:12:alice",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "tokens_in": 100,
        "tokens_out": 20,
        "cached": False,
        "cache_layer": "",
        "latency_ms": 812.5,
        "ttft_ms": 140.0,
        "occurred_at": NOON,
    }
    values.update(overrides)
    return UsageEvent(**values)


def daily_rows(tenant) -> list[tuple]:
    return list(
        UsageDaily.objects.filter(tenant=tenant).order_by("day", "bot", "api_key_id").values_list(*DAILY_FIELDS)
    )


def stream_length() -> int:
    return get_redis().xlen(metering.USAGE_STREAM)


def pending_count() -> int:
    return get_redis().xpending(metering.USAGE_STREAM, USAGE_GROUP)["pending"]


@pytest.mark.django_db
def test_billing_tables_live_in_the_public_schema():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_name, table_schema FROM information_schema.tables "
            "WHERE table_name LIKE 'billing\\_%%' ORDER BY table_name"
        )
        rows = cursor.fetchall()

    assert rows == [
        ("billing_apikeybudget", "public"),
        ("billing_billingevent", "public"),
        ("billing_budgetalert", "public"),
        ("billing_invoice", "public"),
        ("billing_plan", "public"),
        ("billing_tenantbilling", "public"),
        ("billing_usagedaily", "public"),
        ("billing_usagerecord", "public"),
    ]


@pytest.mark.django_db
def test_recorded_usage_is_queued_not_written_until_flushed(tenant_pair):
    usage_record(make_event(tenant_pair.a, "evt-1"))

    assert stream_length() == 1
    assert UsageRecord.objects.count() == 0


@pytest.mark.django_db
def test_flush_writes_records_and_daily_aggregates(tenant_pair):
    acme = tenant_pair.a
    usage_record(make_event(acme, "evt-1"))
    usage_record(make_event(acme, "evt-2", tokens_in=50, tokens_out=5))
    usage_record(make_event(acme, "evt-3", bot="bot_beta", api_key_id=None, cached=True, cache_layer="exact"))
    usage_record(make_event(tenant_pair.b, "evt-4", tokens_in=7, tokens_out=3))

    written = usage_flush()

    assert written == 4
    record = UsageRecord.objects.get(event_id="evt-3")
    assert (record.tenant_id, record.bot, record.api_key_id, record.end_user, record.cached, record.cache_layer) == (
        acme.pk,
        "bot_beta",
        None,
        "key:12:alice",
        True,
        "exact",
    )
    assert (record.provider, record.model, record.latency_ms, record.ttft_ms, record.occurred_at) == (
        "openai",
        "gpt-4o-mini",
        812.5,
        140.0,
        NOON,
    )
    assert daily_rows(acme) == [
        (date(2026, 11, 20), "bot_alpha", 12, 2, 0, 150, 25, 0),
        (date(2026, 11, 20), "bot_beta", 0, 1, 1, 100, 20, 120),
    ]
    assert daily_rows(tenant_pair.b) == [(date(2026, 11, 20), "bot_alpha", 12, 1, 0, 7, 3, 0)]
    assert stream_length() == 0
    assert pending_count() == 0


@pytest.mark.django_db
def test_flush_adds_to_existing_aggregates_atomically(tenant_pair):
    usage_record(make_event(tenant_pair.a, "evt-1"))
    usage_flush()
    usage_record(make_event(tenant_pair.a, "evt-2", tokens_in=1, tokens_out=2))

    assert usage_flush() == 1

    assert daily_rows(tenant_pair.a) == [(date(2026, 11, 20), "bot_alpha", 12, 2, 0, 101, 22, 0)]


@pytest.mark.django_db
def test_days_are_utc_days_whatever_the_events_time_zone(tenant_pair):
    paris_winter = timezone(timedelta(hours=1))
    usage_record(make_event(tenant_pair.a, "late", occurred_at=datetime(2026, 11, 21, 0, 30, tzinfo=paris_winter)))
    usage_record(make_event(tenant_pair.a, "early", occurred_at=datetime(2026, 11, 21, 0, 0, tzinfo=UTC)))

    usage_flush()

    assert daily_rows(tenant_pair.a) == [
        (date(2026, 11, 20), "bot_alpha", 12, 1, 0, 100, 20, 0),
        (date(2026, 11, 21), "bot_alpha", 12, 1, 0, 100, 20, 0),
    ]


@pytest.mark.django_db
def test_a_redelivered_event_is_not_counted_twice(tenant_pair):
    usage_record(make_event(tenant_pair.a, "evt-1"))
    usage_flush()
    usage_record(make_event(tenant_pair.a, "evt-1"))  # the worker retried after recording

    assert usage_flush() == 0

    assert UsageRecord.objects.filter(event_id="evt-1").count() == 1
    assert daily_rows(tenant_pair.a) == [(date(2026, 11, 20), "bot_alpha", 12, 1, 0, 100, 20, 0)]
    assert stream_length() == 0


@pytest.mark.django_db
def test_duplicates_within_one_batch_are_written_once(tenant_pair):
    usage_record(make_event(tenant_pair.a, "evt-1"))
    usage_record(make_event(tenant_pair.a, "evt-1"))

    assert usage_flush() == 1

    assert daily_rows(tenant_pair.a) == [(date(2026, 11, 20), "bot_alpha", 12, 1, 0, 100, 20, 0)]


@pytest.mark.django_db
@override_settings(BILLING_USAGE_CLAIM_IDLE_SECONDS=0)
def test_entries_of_a_flusher_that_died_are_claimed_by_another(tenant_pair):
    client = get_redis()
    usage_record(make_event(tenant_pair.a, "evt-1"))
    usage_record(make_event(tenant_pair.a, "evt-2"))
    usage_flush(consumer="warm-up")  # creates the group (nothing pending yet)
    usage_record(make_event(tenant_pair.a, "evt-3"))
    # A flusher reads evt-3 and dies before writing or acknowledging it.
    client.xreadgroup(USAGE_GROUP, "dead", {metering.USAGE_STREAM: ">"}, count=10)
    assert pending_count() == 1

    assert usage_flush(consumer="alive") == 1

    assert sorted(UsageRecord.objects.values_list("event_id", flat=True)) == ["evt-1", "evt-2", "evt-3"]
    assert pending_count() == 0
    assert stream_length() == 0


@pytest.mark.django_db
@override_settings(BILLING_USAGE_CLAIM_IDLE_SECONDS=0)
def test_a_flusher_dying_after_its_commit_leaves_no_double_count(tenant_pair):
    client = get_redis()
    usage_flush(consumer="warm-up")
    usage_record(make_event(tenant_pair.a, "evt-1"))
    entries = client.xreadgroup(USAGE_GROUP, "dead", {metering.USAGE_STREAM: ">"}, count=10)[0][1]
    # The dead flusher committed its rows but never acknowledged the entries.
    usage_write(events=[UsageEvent.from_json(fields[b"e"]) for _entry_id, fields in entries])

    assert usage_flush(consumer="alive") == 0

    assert daily_rows(tenant_pair.a) == [(date(2026, 11, 20), "bot_alpha", 12, 1, 0, 100, 20, 0)]
    assert pending_count() == 0


@pytest.mark.django_db
def test_a_malformed_entry_goes_to_the_dead_letter_stream_and_the_rest_is_written(tenant_pair):
    client = get_redis()
    usage_record(make_event(tenant_pair.a, "evt-1"))
    client.xadd(metering.USAGE_STREAM, {"e": b"{not json"})
    client.xadd(metering.USAGE_STREAM, {"other": b"x"})
    bad_tokens = make_event(tenant_pair.a, "evt-2").to_json().decode().replace('"tokens_in":100', '"tokens_in":1.5')
    client.xadd(metering.USAGE_STREAM, {"e": bad_tokens})

    assert usage_flush() == 1

    assert client.xlen(metering.USAGE_DEAD_LETTER_STREAM) == 3
    assert stream_length() == 0
    assert pending_count() == 0


@pytest.mark.django_db
def test_events_of_a_deleted_tenant_are_dropped(tenant_pair):
    usage_record(make_event(tenant_pair.a, "evt-1", tenant_schema="no_such_tenant"))
    usage_record(make_event(tenant_pair.a, "evt-2"))

    assert usage_flush() == 1

    assert list(UsageRecord.objects.values_list("event_id", flat=True)) == ["evt-2"]
    assert stream_length() == 0


@pytest.mark.django_db
def test_flush_reads_at_most_a_batch_unless_asked_for_more(tenant_pair):
    for number in range(5):
        usage_record(make_event(tenant_pair.a, f"evt-{number}"))

    assert usage_flush(batch_size=2) == 2
    assert usage_flush(batch_size=2, max_batches=10) == 3
    assert usage_flush(batch_size=2, max_batches=10) == 0


@pytest.mark.django_db
def test_flush_of_an_empty_stream_writes_nothing():
    assert usage_flush() == 0
    assert usage_flush() == 0  # the group exists now


@pytest.mark.django_db
def test_a_batch_costs_the_same_queries_whatever_its_size(tenant_pair, django_assert_num_queries):
    usage_record(make_event(tenant_pair.a, "single"))
    UsageRecord.objects.exists()  # django-tenants sets the search_path on a connection's first query
    # SAVEPOINT, tenant ids, the insert-and-aggregate statement, RELEASE.
    with django_assert_num_queries(4):
        usage_flush()
    for number in range(500):
        usage_record(make_event(tenant_pair.a, f"evt-{number}", bot=f"bot_{number % 7}"))

    with django_assert_num_queries(4):
        assert usage_flush() == 500

    assert UsageDaily.objects.filter(tenant=tenant_pair.a).count() == 8


def _unreachable_redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)


@pytest.mark.django_db
def test_usage_is_written_to_postgres_when_redis_is_down(tenant_pair, monkeypatch):
    monkeypatch.setattr(metering, "get_redis", _unreachable_redis)

    usage_record(make_event(tenant_pair.a, "evt-1"))

    assert list(UsageRecord.objects.values_list("event_id", flat=True)) == ["evt-1"]
    assert daily_rows(tenant_pair.a) == [(date(2026, 11, 20), "bot_alpha", 12, 1, 0, 100, 20, 0)]


@pytest.mark.django_db
def test_async_recording_queues_the_event(tenant_pair):
    event = make_event(tenant_pair.a, "evt-async", ttft_ms=None)

    async_to_sync(usage_record_async)(event)

    [(_entry_id, fields)] = get_redis().xrange(metering.USAGE_STREAM)
    assert UsageEvent.from_json(fields[b"e"]) == event


@pytest.mark.django_db
def test_async_recording_falls_back_to_postgres_when_redis_is_down(tenant_pair, monkeypatch):
    import redis.asyncio as aioredis

    monkeypatch.setattr(
        metering, "get_loop_redis", lambda: aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    )

    async_to_sync(usage_record_async)(make_event(tenant_pair.a, "evt-1"))

    assert list(UsageRecord.objects.values_list("event_id", flat=True)) == ["evt-1"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"tokens_in": -1}, "token counts must be whole numbers", id="negative_tokens_case"),
        pytest.param({"tokens_out": 2**31}, "token counts must be whole numbers", id="huge_tokens_case"),
        pytest.param({"tokens_out": 5.5}, "token counts must be whole numbers", id="fractional_tokens_case"),
        pytest.param({"tokens_in": "5"}, "token counts must be whole numbers", id="text_tokens_case"),
        pytest.param({"bot": None}, "bot must be a string", id="missing_bot_case"),
        pytest.param({"api_key_id": "12"}, "api_key_id must be", id="text_key_case"),
        pytest.param({"occurred_at": datetime(2026, 11, 20, 12, 0)}, "occurred_at must be", id="naive_time_case"),  # noqa: DTZ001
        pytest.param({"event_id": ""}, "event_id must be", id="empty_id_case"),
        pytest.param({"event_id": "x" * 101}, "event_id must be", id="long_id_case"),
    ],
)
def test_bad_usage_events_are_refused_at_construction(overrides, message):
    class Tenant:
        schema_name = "acme"

    values = {"event_id": "evt-1", **overrides}

    with pytest.raises(ValueError, match=message):
        make_event(Tenant(), **values)


# --- concurrency (committed data, several threads) ----------------------------------------------

CONCURRENT_BOT = "bot_concurrent_flush"


@pytest.fixture
def committed_usage_cleanup(django_db_blocker, tenant_pair):
    with django_db_blocker.unblock():
        UsageRecord.objects.filter(bot=CONCURRENT_BOT).delete()
        UsageDaily.objects.filter(bot=CONCURRENT_BOT).delete()
        yield tenant_pair
        UsageRecord.objects.filter(bot=CONCURRENT_BOT).delete()
        UsageDaily.objects.filter(bot=CONCURRENT_BOT).delete()


def test_concurrent_flushers_write_every_event_once(committed_usage_cleanup):
    acme = committed_usage_cleanup.a
    client = get_redis()
    with client.pipeline(transaction=False) as pipe:
        for number in range(3000):
            event = make_event(
                acme, f"cc-{number}", bot=CONCURRENT_BOT, api_key_id=number % 3, tokens_in=1, tokens_out=1
            )
            pipe.xadd(metering.USAGE_STREAM, {"e": event.to_json()})
        pipe.execute()
    written: list[int] = []

    def flusher(name: str) -> None:
        try:
            written.append(usage_flush(batch_size=250, consumer=name, max_batches=100))
        finally:
            connection.close()

    threads = [threading.Thread(target=flusher, args=(f"flusher-{number}",)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(written) == 3000
    assert UsageRecord.objects.filter(bot=CONCURRENT_BOT).count() == 3000
    assert list(
        UsageDaily.objects.filter(bot=CONCURRENT_BOT)
        .order_by("api_key_id")
        .values_list("api_key_id", "requests", "tokens_in")
    ) == [(0, 1000, 1000), (1, 1000, 1000), (2, 1000, 1000)]
    assert stream_length() == 0


@pytest.mark.django_db
def test_the_beat_task_drains_the_stream(tenant_pair):
    from billing.tasks import usage_flush_task

    for number in range(3):
        usage_record(make_event(tenant_pair.a, f"evt-{number}"))

    assert usage_flush_task() == 3
    assert stream_length() == 0


@pytest.mark.django_db
def test_a_usage_event_postgres_refuses_is_dead_lettered_and_the_others_are_written(tenant_pair):
    """Before: one refused row failed the whole usage batch on every flush, for every tenant."""
    usage_record(make_event(tenant_pair.a, "evt-good-a"))
    usage_record(make_event(tenant_pair.a, "evt-bad", bot="bot\x00alpha"))
    usage_record(make_event(tenant_pair.b, "evt-good-b"))

    written = usage_flush()

    assert written == 2
    assert set(UsageRecord.objects.values_list("event_id", flat=True)) == {"evt-good-a", "evt-good-b"}
    [(_id, dead)] = get_redis().xrange(metering.USAGE_DEAD_LETTER_STREAM)
    assert UsageEvent.from_json(dead[b"e"]).event_id == "evt-bad"
    assert dead[b"error"]
    assert get_redis().xlen(metering.USAGE_STREAM) == 0
