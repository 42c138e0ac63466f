"""Browser fixtures: Debian's Chromium driven by Playwright (no browser download), a live Parley
(daphne on a free loopback port, test database and Redis) and pages served from another origin.

Tenant hosts are ``<slug>.localhost:<port>``: Chromium resolves ``*.localhost`` to loopback itself.
"""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests.chat.live import LiveServer, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# machine's closed network refuses (see the environment notes).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    """Package-scoped: Playwright's sync API keeps an event loop running on this thread while it
    lives, and Django refuses ORM calls from a thread with a running loop. The browser tests are
    synchronous code, so the check is lifted for them, and everything ends with this package."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package.")
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            yield launched
            launched.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    opened = context.new_page()
    yield opened
    context.close()


@pytest.fixture(scope="package")
def parley_server(django_db_setup, tenant_pair) -> Iterator[LiveServer]:
    """One daphne for the browser tests (it reads committed data only)."""
    server = LiveServer()
    yield server
    server.stop()


def tenant_url(server: LiveServer, tenant, path: str = "/") -> str:
    return f"http://{tenant.slug}.localhost:{server.port}{path}"


class _StaticPages(http.server.ThreadingHTTPServer):
    pages: dict[str, str]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.pages.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep the test output clean
        return


@pytest.fixture
def host_site() -> Iterator[Callable[[str, str], str]]:
    """Serve HTML from another origin (``http://127.0.0.1:<other port>``): ``host_site(path, html)``
    returns the page's URL — a customer's site embedding the widget."""
    server = _StaticPages(("127.0.0.1", free_port()), _Handler)
    server.pages = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(path: str, html: str) -> str:
        server.pages[path] = html
        return f"http://127.0.0.1:{server.server_address[1]}{path}"

    yield serve
    server.shutdown()
    server.server_close()
