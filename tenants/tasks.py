"""Platform background tasks. Pass ids, never model instances; every task is idempotent."""

from __future__ import annotations

from datetime import datetime

from celery import shared_task

from tenants import services


@shared_task(ignore_result=True, acks_late=True)
def api_key_touch_task(*, api_key_id: int, used_at: str) -> None:
    services.api_key_touch(api_key_id=api_key_id, used_at=datetime.fromisoformat(used_at))
