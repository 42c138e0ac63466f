"""Helpers for admin-site tests: a test client signed in on a tenant's host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from tests.factories import host_of


def site_client(tenant, user=None, **defaults) -> Client:
    """A client whose every request goes to ``tenant``'s host, signed in as ``user`` if given."""
    client = Client(HTTP_HOST=host_of(tenant), **defaults)
    if user is not None:
        client.force_login(user)
    return client


# Every signed-in page costs these: the schema switch, the session's user, the membership check
# of the tenant middleware, and the user's memberships (role and the tenant switcher).
BASE_QUERIES = 4


@contextmanager
def captured_queries() -> Iterator[CaptureQueriesContext]:
    """CaptureQueriesContext on an emptied log (a bounded deque: once full its length stops
    changing). Read the count before the next request: each request starts by emptying the log."""
    connection.queries_log.clear()
    with CaptureQueriesContext(connection) as context:
        yield context
