"""Readiness checks: can this process reach PostgreSQL and Redis right now?

Unauthenticated (probes call it by pod IP), so it says only ok or not — the errors go to the
log — and its answer is reused for ``READINESS_CACHE_SECONDS``: a flood of hits costs at most one
database query and one Redis PING a second per process.
"""

from __future__ import annotations

import threading
import time

import structlog
from django.db import connection

from tenants.redis import get_redis

logger = structlog.get_logger(__name__)
READINESS_CACHE_SECONDS = 1.0
_cache_lock = threading.Lock()
_cached: tuple[float, dict[str, dict]] | None = None


def _timed(name: str, check) -> dict:
    started = time.perf_counter()
    try:
        check()
    except Exception:  # any failure means "not ready"; the details are for the log
        logger.warning("readiness_check_failed", check=name, exc_info=True)
        return {"ok": False}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}


def _database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _redis() -> None:
    get_redis().ping()


def readiness() -> dict[str, dict]:
    """Each check's result, at most ``READINESS_CACHE_SECONDS`` old."""
    global _cached
    with _cache_lock:
        if _cached is not None and time.monotonic() - _cached[0] < READINESS_CACHE_SECONDS:
            return _cached[1]
        checks = {"database": _timed("database", _database), "redis": _timed("redis", _redis)}
        _cached = (time.monotonic(), checks)
        return checks


def readiness_cache_clear() -> None:
    global _cached
    _cached = None
