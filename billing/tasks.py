"""Billing background tasks (Celery beat, public schema). Idempotent; nothing but ids passed.

* ``usage_flush_task``, every 2 s: usage from the Redis Stream into PostgreSQL. Up to
  ``USAGE_FLUSH_MAX_BATCHES`` batches a run, i.e. 10,000 rows every 2 s; a backlog drains at that
  pace. Several workers may run it at once (consumer group); one per worker process is the norm.
* ``budget_reservations_expire_task``, every minute: gives back reservations never settled.
* ``invoices_issue_task``, hourly: issues last month's invoices (a no-op once they exist).
"""

from __future__ import annotations

from datetime import UTC, datetime

from celery import shared_task

from billing import services
from billing.budgets import budget_reservations_expire
from billing.metering import usage_flush
from billing.selectors import months_ago
from tenants.connection import connection

USAGE_FLUSH_BATCH_SIZE = 1_000  # one INSERT of 15,000 parameters: a few milliseconds
USAGE_FLUSH_MAX_BATCHES = 10  # bounds a run to ~1 s of work so runs every 2 s never pile up


@shared_task(ignore_result=True)
def usage_flush_task() -> int:
    connection.set_schema_to_public()
    return usage_flush(batch_size=USAGE_FLUSH_BATCH_SIZE, max_batches=USAGE_FLUSH_MAX_BATCHES)


@shared_task(ignore_result=True)
def budget_reservations_expire_task() -> int:
    from tenants.models import Tenant

    connection.set_schema_to_public()
    schemas = Tenant.objects.exclude(schema_name="public").values_list("schema_name", flat=True)
    return budget_reservations_expire(tenant_schemas=list(schemas))


@shared_task(ignore_result=True)
def invoices_issue_task() -> int:
    connection.set_schema_to_public()
    return services.invoices_issue_for_month(month=months_ago(datetime.now(tz=UTC), 1))
