"""The browser harness itself: Chromium reaches a tenant host of the live server."""

from __future__ import annotations

import pytest

from tests.browser.conftest import tenant_url

pytestmark = pytest.mark.browser


def test_sign_in_page_renders_on_a_tenant_host(page, parley_server, tenant_pair):
    page.goto(tenant_url(parley_server, tenant_pair.a, "/accounts/login/"))

    assert page.locator("input[name=username]").is_visible()
    assert page.locator("input[type=password]").is_visible()
