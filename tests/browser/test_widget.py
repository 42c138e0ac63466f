"""The embeddable widget in a real Chromium, on a customer's page served from another origin than
Parley (``host_site``), against a live daphne and a generation worker in this process.

Covers: the streamed answer with its citation, feedback, history for a returning visitor, a
network drop mid-answer resumed with Last-Event-ID (no duplicated text), an answer carrying HTML
and a ``javascript:`` link that stays inert, and a page whose origin is not allowed.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django_tenants.utils import tenant_context
from playwright.sync_api import Page, expect

from chat.models import Bot, Conversation, Message
from chat.providers.base import ChatRequest, Delta, Provider, Usage
from chat.providers.local import LocalProvider
from chat.selectors import message_list

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(settings.BASE_DIR) / "var" / "screenshots"  # git-ignored

QUESTION = "How many days do I have to return an item?"
XSS_ANSWER = (
    'Here you go <img src=x onerror="window.__xss=1"> and [click](javascript:window.__xss=2) '
    "or [the policy](https://example.com/returns) **now**."
)


class ScriptedProvider(Provider):
    """Streams a fixed answer word by word (what a compromised or tricked model might say)."""

    kind = "scripted"

    def __init__(self, text: str) -> None:
        self.text = text

    def stream(self, request: ChatRequest):
        return self._stream()

    async def _stream(self):
        for word in re.findall(r"\S+\s*", self.text):
            yield Delta(word)
        yield Usage(prompt_tokens=5, completion_tokens=20, finish_reason="stop", provider="scripted", model="s")


class DroppableProxy:
    """A TCP forwarder in front of the live server whose connections the test can cut: a real
    network drop in the middle of a streamed answer (the browser sees the stream break)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        with self.lock:
            dropped, self.sockets = self.sockets, []
        for end in dropped:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


@pytest.fixture
def proxy(parley_server) -> Iterator[DroppableProxy]:
    running = DroppableProxy(parley_server.port)
    yield running
    running.close()


def _host_page(host_site, server, bot, *, path: str = "/shop.html") -> str:
    html = (
        "<!doctype html><html><head><title>Shop</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<style>button{background:red!important} div{color:green}</style></head>"
        "<body><h1>Our shop</h1>"
        f'<script src="{server.url}/static/widget/parley.js" data-bot="{bot.public_id}" async></script>'
        "</body></html>"
    )
    return host_site(path, html)


def _origin(url: str) -> str:
    return re.match(r"^https?://[^/]+", url).group(0)


@pytest.fixture
def shop(live, host_site, parley_server, django_db_blocker):
    """The live bot on a customer's page; the bot allows that page's origin."""
    url = _host_page(host_site, parley_server, live["bot"])
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(
            allowed_origins=[_origin(url)],
            greeting="Hi! Ask me about returns.",
            theme={"primary_color": "#0a7d45", "text_color": "#ffffff", "position": "left"},
        )
    return {"url": url, **live}


def _open(page: Page, url: str) -> None:
    page.goto(url)
    page.get_by_role("button", name="Open chat").click()
    expect(page.get_by_role("dialog", name="Support")).to_be_visible()


def _ask(page: Page, text: str) -> None:
    box = page.get_by_label("Message")
    box.fill(text)
    box.press("Enter")


def _answer(page: Page):
    return page.locator("#parley-widget .msg.assistant:not(.greeting)").last


def _stored_answer(shop, django_db_blocker) -> str:
    with django_db_blocker.unblock(), tenant_context(shop["tenant"]):
        conversation = Conversation.objects.get(bot=shop["bot"], end_user_kind="visitor")
        return [m.content for m in message_list(conversation=conversation) if m.role == "assistant"][-1]


def test_visitor_asks_sees_streamed_answer_with_citation_and_history(
    page, shop, worker, provider_choice, django_db_blocker
):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.01)
    _open(page, shop["url"])
    expect(page.locator("#parley-widget .greeting")).to_have_text("Hi! Ask me about returns.")
    launcher_color = page.locator("#parley-widget .launcher").evaluate("b => getComputedStyle(b).backgroundColor")
    assert launcher_color == "rgb(10, 125, 69)"  # themed, and the page's `button{red!important}` does not leak in
    assert page.get_by_label("Message").evaluate("e => e === e.getRootNode().activeElement")  # focus moved in

    _ask(page, QUESTION)

    answer = _answer(page)
    expect(answer).to_contain_text("30 days", timeout=15_000)
    expect(answer.locator(".sources li")).to_have_text(["Returns policy"])
    expect(answer.get_by_role("button", name="Helpful", exact=True)).to_be_visible()
    expect(answer.locator(".cite").first).to_have_text("[1]")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "widget-answer.png")
    answer.get_by_role("button", name="Helpful", exact=True).click()
    expect(answer.get_by_role("button", name="Helpful", exact=True)).to_have_attribute("aria-pressed", "true")
    stored = page.evaluate("Object.keys(localStorage).sort()")
    bot_id = shop["bot"].public_id
    assert stored == [f"parley:{bot_id}:conversation", f"parley:{bot_id}:visitor"]
    with django_db_blocker.unblock(), tenant_context(shop["tenant"]):
        verdicts = list(Message.objects.filter(role="assistant", conversation__bot=shop["bot"]).values_list("feedback"))
    assert verdicts == [("up",)]

    page.reload()  # a returning visitor sees the conversation
    _open(page, shop["url"])
    expect(page.locator("#parley-widget .msg.user")).to_have_text([QUESTION])
    expect(_answer(page)).to_contain_text("30 days")
    expect(_answer(page).get_by_role("button", name="Helpful", exact=True)).to_have_attribute("aria-pressed", "true")

    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog", name="Support")).to_be_hidden()


def test_network_drop_mid_answer_resumes_to_the_full_answer(
    page, shop, worker, provider_choice, django_db_blocker, host_site, proxy
):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.05)
    url = _host_page(host_site, proxy, shop["bot"])  # the widget reaches Parley through the proxy
    resumes = []
    page.on(
        "request",
        lambda request: (
            resumes.append(request.headers.get("last-event-id"))
            if "/events/" in request.url and request.method == "GET"
            else None
        ),
    )
    _open(page, url)

    _ask(page, QUESTION)
    expect(_answer(page)).to_contain_text("Customers", timeout=15_000)
    proxy.drop()  # the stream breaks mid-answer; the browser is offline for a moment
    page.context.set_offline(True)
    page.wait_for_timeout(600)
    page.context.set_offline(False)

    expect(_answer(page).get_by_role("button", name="Helpful", exact=True)).to_be_visible(timeout=20_000)
    stored = _stored_answer(shop, django_db_blocker)
    shown = _answer(page).locator(".body").inner_text()
    assert [header for header in resumes if header], "the widget never resumed"
    rendered = re.sub(r"(?m)^>\s?", "", stored).replace("**", "")  # the Markdown the widget turned into elements
    assert " ".join(shown.split()) == " ".join(rendered.split())
    assert shown.count("30 days") == 1


def test_html_and_javascript_links_in_an_answer_stay_inert(page, shop, worker, provider_choice):
    provider_choice["provider"] = ScriptedProvider(XSS_ANSWER)
    _open(page, shop["url"])

    _ask(page, "Tell me something")

    answer = _answer(page)
    expect(answer.get_by_role("button", name="Helpful", exact=True)).to_be_visible(timeout=15_000)
    expect(answer).to_contain_text('<img src=x onerror="window.__xss=1">')
    assert page.locator("#parley-widget img").count() == 0
    assert answer.locator("a").count() == 1
    expect(answer.locator("a")).to_have_attribute("href", "https://example.com/returns")
    expect(answer.locator("a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    expect(answer.locator("strong")).to_have_text("now")
    answer.get_by_text("click").click()
    assert page.evaluate("typeof window.__xss") == "undefined"


def test_a_page_from_a_disallowed_origin_is_refused(page, live, host_site, parley_server, django_db_blocker):
    with django_db_blocker.unblock(), tenant_context(live["tenant"]):
        Bot.objects.filter(pk=live["bot"].pk).update(allowed_origins=["https://www.example.com"])
    url = _host_page(host_site, parley_server, live["bot"], path="/elsewhere.html")
    statuses = []
    page.on("response", lambda response: statuses.append(response.status) if "/session/" in response.url else None)

    page.goto(url)
    page.get_by_role("button", name="Open chat").click()

    expect(page.get_by_role("alert")).to_contain_text("is not allowed to use this chat bot")
    expect(page.get_by_label("Message")).to_be_disabled()
    assert set(statuses) == {403}


def test_keyboard_and_narrow_screens(browser, shop):
    context = browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(shop["url"])
        launcher = page.get_by_role("button", name="Open chat")
        expect(launcher).to_be_visible()
        page.keyboard.press("Tab")
        assert launcher.evaluate("b => b === b.getRootNode().activeElement")
        page.keyboard.press("Enter")

        panel = page.get_by_role("dialog", name="Support")
        expect(panel).to_be_visible()
        box = panel.bounding_box()
        assert (box["x"], box["y"], box["width"], box["height"]) == (0, 0, 375, 700)  # full screen
        expect(page.get_by_label("Message")).to_be_focused()
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=SCREENSHOTS / "widget-mobile.png")
        page.keyboard.press("Escape")
        expect(panel).to_be_hidden()
        assert launcher.evaluate("b => b === b.getRootNode().activeElement")  # focus back on the launcher
    finally:
        context.close()


def test_stop_then_new_conversation(page, shop, worker, provider_choice, django_db_blocker):
    provider_choice["provider"] = LocalProvider(seconds_per_word=0.05)
    _open(page, shop["url"])
    _ask(page, QUESTION)
    expect(_answer(page)).to_contain_text("extractive", timeout=15_000)

    page.get_by_role("button", name="Stop").click()

    expect(_answer(page).get_by_role("button", name="Helpful", exact=True)).to_be_visible(timeout=15_000)
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    with django_db_blocker.unblock(), tenant_context(shop["tenant"]):
        conversation = Conversation.objects.get(bot=shop["bot"], end_user_kind="visitor")
        answers = [m for m in message_list(conversation=conversation) if m.role == "assistant"]
    assert [answer.finish_reason for answer in answers] == ["cancelled"]
    assert "30 days" not in answers[0].content

    page.get_by_role("button", name="New conversation").click()
    expect(page.locator("#parley-widget .msg")).to_have_count(1)  # the greeting only
    assert page.evaluate("Object.keys(localStorage)") == [f"parley:{shop['bot'].public_id}:visitor"]
