"""Security: sign-in failures are throttled per address across usernames, not only per
username and address (issue 18, Low 14: credential stuffing)."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.factories import PASSWORD, host_of

pytestmark = pytest.mark.django_db


def _login(client: Client, tenant, email: str, password: str, address: str):
    return client.post(
        "/accounts/login/", {"username": email, "password": password}, HTTP_HOST=host_of(tenant), REMOTE_ADDR=address
    )


def test_failures_across_usernames_lock_the_address_out(tenant_pair, settings):
    settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT = 6
    stuffer = Client()
    for number in range(settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT):  # each username fails once only
        _login(stuffer, tenant_pair.a, f"victim{number}@example.test", "guess", "198.51.100.7")

    from_there = _login(stuffer, tenant_pair.a, tenant_pair.owner_a.email, PASSWORD, "198.51.100.7")
    elsewhere = Client()
    from_elsewhere = _login(elsewhere, tenant_pair.a, tenant_pair.owner_a.email, PASSWORD, "198.51.100.8")

    assert from_there.status_code == 429
    assert "_auth_user_id" not in stuffer.session
    assert from_elsewhere.status_code == 302
    assert "_auth_user_id" in elsewhere.session


def test_a_few_failures_across_usernames_do_not_lock_the_address(tenant_pair, settings):
    settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT = 6
    office = Client()
    for number in range(settings.PARLEY_LOGIN_ADDRESS_FAILURE_LIMIT - 2):
        _login(office, tenant_pair.a, f"colleague{number}@example.test", "typo", "198.51.100.9")

    response = _login(office, tenant_pair.a, tenant_pair.owner_a.email, PASSWORD, "198.51.100.9")

    assert response.status_code == 302
