"""Benchmark fixtures: a database and a Redis database of their own, and the data they measure.

Benchmarks commit what they create (the in-process ASGI app serves requests on other threads,
with their own database connections, so nothing may hide in a test transaction). They must
therefore never share storage with the main suite, which may be running at the same time:
its autouse fixture flushes its Redis database before every test, which would turn cache hits
here into database loads mid-measurement, and our flushes would break its tests.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from django.conf import settings
from django.test import override_settings

from tenants.models import ApiKey
from tenants.redis import get_redis
from tenants.resolution import api_key_cache_invalidate
from tests.factories import TenantPair, make_api_key

BENCH_DATABASE_NAME = "parley_bench"
# The main suite uses REDIS_TEST_DB (9 by default); logical databases are free to pick.
BENCH_REDIS_DB = 10


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """``make bench`` sets DATABASE_TEST_NAME=parley_bench; this holds even when it is not set."""
    test_settings = settings.DATABASES["default"].setdefault("TEST", {})
    if not str(test_settings.get("NAME") or "").endswith("_bench"):
        test_settings["NAME"] = BENCH_DATABASE_NAME


@pytest.fixture(scope="session", autouse=True)
def _bench_redis_database():
    """Point the cache, the raw Redis client and the Celery broker at the benchmarks' own database."""
    from config.celery import app as celery_app

    redis_url = settings.REDIS_URL.rsplit("/", 1)[0] + f"/{BENCH_REDIS_DB}"
    caches = {**settings.CACHES, "default": {**settings.CACHES["default"], "LOCATION": redis_url}}
    broker_url = celery_app.conf.broker_url
    with override_settings(REDIS_URL=redis_url, CACHES=caches, CELERY_BROKER_URL=redis_url):
        celery_app.conf.broker_url = redis_url
        get_redis.cache_clear()
        yield redis_url
    celery_app.conf.broker_url = broker_url
    get_redis.cache_clear()


@pytest.fixture
def bench_api_key(tenant_pair: TenantPair, django_db_blocker) -> tuple[ApiKey, str]:
    """A committed API key of tenant A (all scopes), deleted afterwards."""
    with django_db_blocker.unblock():
        api_key, raw_key = make_api_key(tenant_pair.a, name="benchmark key")
    yield api_key, raw_key
    with django_db_blocker.unblock():
        api_key.delete()
        api_key_cache_invalidate(api_key.prefix)


@contextmanager
def gateway_unlimited(tenant, api_key):
    """Plan and key limits far above any load a benchmark makes (committed; restored after): the
    benchmarks measure serving, not the rate limiter refusing them with 429."""
    from billing.models import ApiKeyBudget, Plan
    from tenants.models import Tenant

    previous_plan_id = Tenant.objects.filter(pk=tenant.pk).values_list("plan_id", flat=True).first()
    plan, _ = Plan.objects.update_or_create(
        code="bench-unlimited",
        defaults={
            "name": "Benchmarks (no practical limits)",
            "requests_per_minute": 1_000_000,
            "tokens_per_minute": 1_000_000_000,
            "included_tokens_per_month": 10**12,
        },
    )
    Tenant.objects.filter(pk=tenant.pk).update(plan=plan)
    ApiKeyBudget.objects.update_or_create(
        api_key=api_key, defaults={"requests_per_minute": 1_000_000, "tokens_per_minute": 1_000_000_000}
    )
    try:
        yield
    finally:
        Tenant.objects.filter(pk=tenant.pk).update(plan_id=previous_plan_id)
