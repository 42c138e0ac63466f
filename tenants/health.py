"""Readiness checks: can this process reach PostgreSQL and Redis right now?"""

from __future__ import annotations

import time

from django.db import connection

from tenants.redis import get_redis


def _timed(check) -> dict:
    started = time.perf_counter()
    try:
        check()
    except Exception as error:  # noqa: BLE001 - any failure means "not ready", reported as such
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _redis() -> None:
    get_redis().ping()


def readiness() -> dict[str, dict]:
    return {"database": _timed(_database), "redis": _timed(_redis)}
