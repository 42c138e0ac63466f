"""Tenant provisioning time at 1, 100 and 1,000 existing tenants (target: < 1 s each, flat).

``tenant_create`` replays the template schema's captured DDL, so its own work does not grow with
the number of tenants; what can still grow is PostgreSQL's side (the catalog, and anything every
tenant schema attaches to a shared table). Tenants are created for real and committed:
provisioning is DDL, and a rolled-back transaction would hide exactly that growth.

They are created in a scratch copy of the bench database, dropped at the end (and before the
start, should an interrupted run have left it). Dropping a database takes a second where
dropping a thousand schemas takes minutes, and a thousand tenants kept in the bench database
would slow every later session by minutes more: its database setup runs ``migrate`` even with
``--reuse-db``, and django-tenants' ``migrate`` visits every tenant schema (~0.1 s each here).
Every run therefore starts from the bench database's own tenants and measures every level.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from django.db import connection
from psycopg import sql

from tenants.models import Tenant, User
from tenants.services import tenant_create, tenant_delete, user_create
from tests.perf.reporting import (
    Distribution,
    environment_markdown,
    format_duration,
    markdown_table,
    report_write,
    run_environment,
    text_table,
)

LEVELS = (1, 100, 1000)
TIMED_CREATIONS_PER_LEVEL = 5
CURVE_BUCKET = 100  # creations grouped by tenants existing before them: 0-99, 100-199, …
SLUG_PREFIX = "bench-"
OWNER_EMAIL = "bench-owner@example.test"
SCRATCH_SUFFIX = "_provisioning"
# Copying a database needs it to be idle; autovacuum may be visiting it. PostgreSQL itself waits
# 5 s per attempt before giving up.
COPY_ATTEMPTS = 6


def _maintenance_connection() -> psycopg.Connection:
    settings_dict = connection.settings_dict
    return psycopg.connect(
        host=settings_dict["HOST"] or None,
        port=settings_dict["PORT"] or None,
        user=settings_dict["USER"] or None,
        password=settings_dict.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
    )


@contextmanager
def _scratch_database() -> Iterator[str]:
    """Point the default connection at a fresh copy of the current database, then drop the copy."""
    original = connection.settings_dict["NAME"]
    scratch = f"{original}{SCRATCH_SUFFIX}"
    drop = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(scratch))
    copy = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(scratch), sql.Identifier(original))
    connection.close()
    with _maintenance_connection() as maintenance:
        maintenance.execute(drop)
        for attempt in range(1, COPY_ATTEMPTS + 1):
            try:
                maintenance.execute(copy)
                break
            except psycopg.errors.ObjectInUse:
                if attempt == COPY_ATTEMPTS:
                    raise
    connection.settings_dict["NAME"] = scratch
    try:
        yield scratch
    finally:
        connection.close()
        connection.settings_dict["NAME"] = original
        with _maintenance_connection() as maintenance:
            maintenance.execute(drop)


def _timed_delete(tenant: Tenant) -> float:
    started = time.perf_counter()
    tenant_delete(tenant=tenant)
    return time.perf_counter() - started


def test_tenant_provisioning_time(tenant_pair, django_db_blocker, request):
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
        started = time.perf_counter()
        with _scratch_database() as scratch:
            environment["database"] = scratch
            owner = User.objects.filter(email=OWNER_EMAIL).first() or user_create(email=OWNER_EMAIL, password=None)
            existing = Tenant.objects.count()
            creations: list[tuple[int, float]] = []  # (tenants existing before, seconds), every creation
            levels: dict[int, list[tuple[int, float]]] = {}
            timed_tenants: list[Tenant] = []

            def create() -> tuple[tuple[int, float], Tenant]:
                nonlocal existing
                number = len(creations) + 1
                before = time.perf_counter()
                tenant = tenant_create(name=f"Bench {number}", slug=f"{SLUG_PREFIX}{number:05d}", owner=owner)
                creations.append((existing, time.perf_counter() - before))
                existing += 1
                return creations[-1], tenant

            for level in LEVELS:
                while existing < level:
                    create()
                timed = [create() for _ in range(TIMED_CREATIONS_PER_LEVEL)]
                levels[level] = [creation for creation, _ in timed]
                timed_tenants += [tenant for _, tenant in timed]
            assert Tenant.objects.count() == existing
            tenants_at_deletion = existing
            deletions = [_timed_delete(tenant) for tenant in timed_tenants]
            assert Tenant.objects.count() == existing - len(timed_tenants)
        total_seconds = time.perf_counter() - started

    level_headers = ["level", "existing tenants", "timed creations", "p50 s", "max s"]
    level_rows = []
    for level, timed in levels.items():
        seconds = Distribution.of([duration for _, duration in timed])
        counts = [count for count, _ in timed]
        level_rows.append(
            [
                f"{level:,}",
                f"{min(counts):,}-{max(counts):,}",
                seconds.count,
                format_duration(seconds.p50, "s"),
                format_duration(seconds.max, "s"),
            ]
        )
    buckets: dict[int, list[float]] = defaultdict(list)
    for count, duration in creations:
        buckets[count // CURVE_BUCKET * CURVE_BUCKET].append(duration)
    curve = {start: Distribution.of(durations) for start, durations in sorted(buckets.items())}
    curve_headers = ["existing tenants", "creations", "p50 s", "p90 s", "max s"]
    curve_rows = [
        [
            f"{start:,}-{start + CURVE_BUCKET - 1:,}",
            seconds.count,
            *(format_duration(getattr(seconds, f), "s") for f in ("p50", "p90", "max")),
        ]
        for start, seconds in curve.items()
    ]
    deleted = Distribution.of(deletions)
    deletion_line = (
        f"tenant_delete of the {deleted.count} timed tenants at ~{tenants_at_deletion:,} tenants: "
        f"p50 {format_duration(deleted.p50, 's')} s, max {format_duration(deleted.max, 's')} s"
    )
    summary = (
        f"{len(creations):,} tenants created with tenant_create (with an owner, committed) in a scratch copy "
        f"of the bench database, {TIMED_CREATIONS_PER_LEVEL} timed at each level; "
        f"{total_seconds:.0f} s in all, copy and drop included."
    )

    print(f"\nTenant provisioning: {summary}")
    print(text_table(level_headers, level_rows))
    print("\nEvery creation, by tenants existing before it:")
    print(text_table(curve_headers, curve_rows))
    print(f"\n{deletion_line}")

    results = {
        "environment": environment,
        "method": {
            "service": "tenants.services.tenant_create(name, slug, owner), committed",
            "database": "scratch copy of the bench database (CREATE DATABASE ... TEMPLATE), dropped afterwards",
            "levels": list(LEVELS),
            "timed_creations_per_level": TIMED_CREATIONS_PER_LEVEL,
        },
        "levels_s": {
            str(level): {
                "existing_tenants": [count for count, _ in timed],
                "seconds": [round(duration, 4) for _, duration in timed],
                **Distribution.of([duration for _, duration in timed]).as_dict(unit="s"),
            }
            for level, timed in levels.items()
        },
        "curve_s": {str(start): seconds.as_dict(unit="s") for start, seconds in curve.items()},
        "creations": len(creations),
        "deletion_s": {"tenants_existing": tenants_at_deletion, **deleted.as_dict(unit="s")},
        "total_s": round(total_seconds, 1),
        "target_s": {"per_creation": 1.0},
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            summary + " Target: < 1 s at every level, flat as tenants grow.",
            markdown_table(level_headers, level_rows),
            "Every creation, by tenants existing before it:",
            markdown_table(curve_headers, curve_rows),
            deletion_line + ".",
        ]
    )
    report_write(name="tenant_provisioning", title="Tenant provisioning", results=results, markdown=markdown)
