"""Chat background tasks (Celery beat). Idempotent; nothing but ids passed.

* ``messages_flush_task``, about every second: finished messages from the Redis Stream into
  PostgreSQL (chat.memory.persistence). Several workers may run it at once (consumer group).
* ``conversation_summarise_task``, on demand: folds a conversation's older turns into its summary
  (the ``summary`` history strategy).
* ``conversations_purge_task``, hourly: each tenant's conversations past its retention, with their
  messages and hot-store entries, in short batches.
"""

from __future__ import annotations

import structlog
from celery import shared_task
from django_tenants.utils import schema_context

from chat.memory.persistence import messages_flush
from chat.services import conversations_purge_expired
from tenants.connection import connection

logger = structlog.get_logger(__name__)

FLUSH_MAX_BATCHES = 10  # 10 x 1,000 rows bounds a run to about a second: runs never pile up


@shared_task(ignore_result=True)
def messages_flush_task() -> int:
    connection.set_schema_to_public()
    return messages_flush(max_batches=FLUSH_MAX_BATCHES)


@shared_task(ignore_result=True, acks_late=True)
def conversation_summarise_task(schema_name: str, conversation_id: str) -> bool:
    from chat.memory.summaries import conversation_summarise

    with schema_context(schema_name):
        return conversation_summarise(conversation_id=conversation_id)


@shared_task(ignore_result=True)
def conversations_purge_task() -> int:
    from tenants.models import Tenant

    connection.set_schema_to_public()
    purged = 0
    for schema_name, days in Tenant.objects.exclude(schema_name="public").values_list(
        "schema_name", "conversation_retention_days"
    ):
        with schema_context(schema_name):
            count = conversations_purge_expired(retention_days=days)
        if count:
            logger.info("conversations_purged", tenant=schema_name, count=count, retention_days=days)
        purged += count
    return purged
