"""Security: tenant-configured model, pool, embedder and reranker URLs cannot reach internal
addresses (issue 18, High 2) — refused when configured, and again when connecting."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chat.providers.base import ChatRequest, ProviderError, collect
from chat.providers.openai_compat import CLIENTS, openai_compat_provider
from chat.providers.registry import validate_route_config
from chat.providers.vllm_pool import VllmPoolProvider
from tenants.errors import ValidationFailed

HELLO = [{"role": "user", "content": "Hello there"}]
INTERNAL_URLS = [
    pytest.param("http://127.0.0.1:9100/v1", id="loopback_case"),
    pytest.param("http://localhost:9100/v1", id="localhost_case"),
    pytest.param("http://0x7f.1/v1", id="legacy_ipv4_case"),
    pytest.param("http://10.0.0.5/v1", id="private_case"),
    pytest.param("http://169.254.169.254/latest/meta-data", id="metadata_case"),
    pytest.param("http://100.100.100.200/v1", id="shared_space_case"),
    pytest.param("http://[::1]:9100/v1", id="ipv6_loopback_case"),
    pytest.param("http://[::ffff:169.254.169.254]/v1", id="ipv6_mapped_metadata_case"),
    pytest.param("http://[fd00:ec2::254]/v1", id="ipv6_metadata_case"),
    pytest.param("http://[fe80::1]/v1", id="ipv6_link_local_case"),
    pytest.param("http://[64:ff9b::a9fe:a9fe]/v1", id="nat64_metadata_case"),
]
MALFORMED_URLS = [
    pytest.param("https://api.example.com/v1?api-version=1", id="query_case"),
    pytest.param("https://user:secret@api.example.com/v1", id="credentials_case"),
    pytest.param("https://api.example.com/v1#x", id="fragment_case"),
    pytest.param("file:///etc/passwd", id="scheme_case"),
]


@pytest.fixture
def nothing_allowed(settings):
    settings.PARLEY_OUTBOUND_ALLOWLIST = []


def _openai_route(url: str) -> dict:
    return {"targets": [{"kind": "openai", "base_url": url, "model": "m"}]}


def _pool_route(url: str, **options) -> dict:
    endpoints = ["https://93.184.215.14:8000", url]
    return {"targets": [{"kind": "vllm_pool", "endpoints": endpoints, "model": "m", **options}]}


@pytest.mark.parametrize("url", INTERNAL_URLS + MALFORMED_URLS)
def test_provider_route_refuses_internal_and_malformed_base_urls(nothing_allowed, url):
    with pytest.raises(ValidationFailed) as refused:
        validate_route_config(_openai_route(url))

    assert refused.value.param == "targets.0.base_url"


@pytest.mark.parametrize("url", INTERNAL_URLS + MALFORMED_URLS)
def test_vllm_pool_refuses_internal_and_malformed_endpoints(nothing_allowed, url):
    with pytest.raises(ValidationFailed) as refused:
        validate_route_config(_pool_route(url))

    assert refused.value.param == "targets.0.endpoints.1"


def test_operator_allowlist_admits_a_self_hosted_network(settings):
    settings.PARLEY_OUTBOUND_ALLOWLIST = ["10.20.0.0/16", "models.corp.example"]

    allowed = validate_route_config(_openai_route("http://10.20.3.4:8000/v1"))
    by_name = validate_route_config(_openai_route("http://models.corp.example:8000/v1"))

    assert allowed["targets"][0]["base_url"] == "http://10.20.3.4:8000/v1"
    assert by_name["targets"][0]["base_url"] == "http://models.corp.example:8000/v1"
    with pytest.raises(ValidationFailed):
        validate_route_config(_openai_route("http://10.21.3.4:8000/v1"))


def test_vllm_pool_probe_interval_has_a_one_second_floor():
    with pytest.raises(ValidationFailed) as refused:
        validate_route_config(_pool_route("https://93.184.215.15:8000", scrape_interval=0.05))
    accepted = validate_route_config(_pool_route("https://93.184.215.15:8000", scrape_interval=1))

    assert refused.value.param == "targets.0.scrape_interval"
    assert accepted["targets"][0]["scrape_interval"] == 1


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["literal_case", "resolved_name_case"])
async def test_connection_to_internal_address_refused_at_connect_time(nothing_allowed, mock_llm, client, host):
    # Built directly, as a configuration saved before the guard existed would be.
    url = mock_llm.base_url.replace("127.0.0.1", host)
    provider = openai_compat_provider(client=client, base_url=url, model="mock-model", timeout=2.0)
    try:
        with pytest.raises(ProviderError):
            await collect(provider.stream(ChatRequest(messages=HELLO)))
    finally:
        await provider.aclose()

    assert mock_llm.count() == 0


async def test_connection_through_the_allowlist_reaches_the_mock(settings, mock_llm):
    settings.PARLEY_OUTBOUND_ALLOWLIST = ["127.0.0.1/32"]
    provider = openai_compat_provider(client="sdk", base_url=mock_llm.base_url, model="mock-model", timeout=5.0)
    try:
        completion = await collect(provider.stream(ChatRequest(messages=HELLO)))
    finally:
        await provider.aclose()

    assert completion.text
    assert mock_llm.count() == 1


async def test_vllm_pool_probes_refused_to_internal_addresses(nothing_allowed, mock_llm):
    pool = VllmPoolProvider(endpoints=[mock_llm.url], model="mock-model", scrape_interval=60)
    try:
        await pool.refresh()
    finally:
        await pool.aclose()

    assert mock_llm.state.stats()["counts"].get("health", 0) == 0
    assert pool.replicas[0].is_healthy is False


@pytest.fixture
def redirector(mock_llm) -> Iterator[str]:
    """A server on 127.0.0.2 that redirects every request to the mock on 127.0.0.1."""
    target = mock_llm.url

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(307)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.2", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.2:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("client", CLIENTS)
async def test_redirect_to_internal_address_refused(settings, mock_llm, redirector, client):
    settings.PARLEY_OUTBOUND_ALLOWLIST = ["127.0.0.2/32"]
    provider = openai_compat_provider(client=client, base_url=redirector, model="mock-model", timeout=2.0)
    try:
        with pytest.raises(ProviderError):
            await collect(provider.stream(ChatRequest(messages=HELLO)))
    finally:
        await provider.aclose()

    assert mock_llm.count() == 0


@pytest.fixture
def metadata_name(monkeypatch):
    """A public-looking host name whose DNS answer is the cloud metadata address."""
    import socket

    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if host == "models.evil.example":
            looked_up.append(host)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 443))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


@pytest.mark.django_db
def test_saving_a_route_whose_name_resolves_internally_is_refused(nothing_allowed, metadata_name, tenant_pair):
    from django_tenants.utils import tenant_context

    from chat.models import Bot
    from chat.services import bot_create

    route = _openai_route("https://models.evil.example/v1")
    with tenant_context(tenant_pair.a), pytest.raises(ValidationFailed) as refused:
        bot_create(name="Evil", provider_route=route)

    assert refused.value.param == "provider_route.targets.0.base_url"
    with tenant_context(tenant_pair.a):
        assert not Bot.objects.filter(name="Evil").exists()


def test_registry_validation_stays_offline(nothing_allowed, metadata_name):
    # Stored routes are validated on every build: no DNS there (the connection checks the name).
    validate_route_config(_openai_route("https://models.evil.example/v1"))

    assert metadata_name == []
