"""SSRF-safe fetching: URL checks, address checks at connect time, redirects, limits and timeouts.

Real HTTP against servers on loopback, let through by ``KNOWLEDGE_FETCH_ALLOWED_HOSTS``; host
names are resolved by a fake ``getaddrinfo``, so nothing leaves the machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from knowledge import fetching
from knowledge.fetching import USER_AGENT, Fetched, FetchError, fetch_url, is_public_address, validate_url

DOCUMENT = b"Parley knowledge: refunds take 14 days."
BIG_BODY = b"x" * 2000


@dataclass
class DocumentServer:
    url: str
    port: int
    requests: list[dict[str, str]] = field(default_factory=list)  # path, host, user_agent, encoding


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        self.server.record.requests.append(
            {
                "path": self.path,
                "host": self.headers.get("Host", ""),
                "user_agent": self.headers.get("User-Agent", ""),
                "encoding": self.headers.get("Accept-Encoding", ""),
            }
        )
        if parts.path == "/docs/refund%20policy.txt":
            self._answer(200, DOCUMENT, content_type="text/plain; charset=utf-8")
        elif parts.path == "/redirect":
            self._redirect(parse_qs(parts.query)["to"][0])
        elif parts.path == "/relative-redirect":
            self._redirect("/docs/refund%20policy.txt", status=301)
        elif parts.path == "/loop":
            self._redirect("/loop")
        elif parts.path == "/big":
            self._answer(200, BIG_BODY)
        elif parts.path == "/big-without-length":
            # HTTP/1.0 without Content-Length: the body ends when the connection closes.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(BIG_BODY)
        elif parts.path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        elif parts.path.startswith("/status/"):
            self._answer(int(parts.path.rsplit("/", 1)[1]), b"nope")
        else:
            self._answer(404, b"not found")

    def _answer(self, status: int, body: bytes, *, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, *, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    record: DocumentServer


@pytest.fixture(scope="module")
def _document_server() -> Iterator[DocumentServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    port = server.server_address[1]
    server.record = DocumentServer(url=f"http://127.0.0.1:{port}", port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.record
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def document_server(_document_server, settings) -> DocumentServer:
    """A local document server, allowed as 127.0.0.1:<its port> (and as docs.example:<its port>)."""
    _document_server.requests.clear()
    settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS = [
        f"127.0.0.1:{_document_server.port}",
        f"docs.example:{_document_server.port}",
    ]
    return _document_server


@dataclass
class FakeDns:
    names: dict[str, list[str]] = field(default_factory=dict)  # host name → addresses
    lookups: list[str] = field(default_factory=list)  # host names asked for, in order


@pytest.fixture
def fake_dns(monkeypatch) -> FakeDns:
    """Host names answered by ``socket.getaddrinfo`` from ``names``; any other name fails to resolve.

    IP literals still go to the real function (httpcore hands it the pinned address).
    """
    dns = FakeDns()
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            dns.lookups.append(host)
            if host not in dns.names:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
            return [
                (
                    socket.AF_INET6 if ":" in address else socket.AF_INET,
                    socket.SOCK_STREAM,
                    socket.IPPROTO_TCP,
                    "",
                    (address, port, 0, 0) if ":" in address else (address, port),
                )
                for address in dns.names[host]
            ]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return dns


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_port(settings) -> Iterator[int]:
    """An allowed port that accepts connections (the kernel does, from the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS = [f"127.0.0.1:{port}"]
        yield port


# ---------------------------------------------------------------------------------------------
# validate_url


def test_validate_url_accepts_public_http_urls():
    assert validate_url("  https://docs.example.com/guide.pdf?v=2#top ") == "https://docs.example.com/guide.pdf?v=2#top"
    assert validate_url("HTTP://example.com:8080") == "HTTP://example.com:8080"
    assert validate_url("http://93.184.216.34/page") == "http://93.184.216.34/page"
    assert validate_url("http://[2606:4700:4700::1111]/") == "http://[2606:4700:4700::1111]/"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://example.com/file.txt", id="ftp_case"),
        pytest.param("file:///etc/passwd", id="file_case"),
        pytest.param("gopher://example.com:70/", id="gopher_case"),
        pytest.param("javascript:alert(1)", id="javascript_case"),
        pytest.param("example.com/page", id="no_scheme_case"),
        pytest.param("http://", id="no_host_case"),
        pytest.param("http:///path", id="empty_host_case"),
        pytest.param("", id="empty_case"),
        pytest.param("https://user:secret@example.com/", id="credentials_case"),
        pytest.param("https://user@example.com/", id="username_case"),
        pytest.param("https://example.com:99999/", id="port_out_of_range_case"),
        pytest.param("https://example.com:http/", id="port_not_a_number_case"),
        pytest.param("https://exa mple.com/", id="space_case"),
        pytest.param("https://example.com/\r\nX-Injected: 1", id="crlf_case"),
        pytest.param("https://example.com/" + "a" * 2048, id="too_long_case"),
    ],
)
def test_validate_url_rejects_invalid_urls(url):
    with pytest.raises(FetchError) as caught:
        validate_url(url)

    assert caught.value.code == "invalid_url"
    assert caught.value.is_transient is False


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1", id="loopback_case"),
        pytest.param("127.9.9.9", id="loopback_range_case"),
        pytest.param("10.0.0.1", id="private_10_case"),
        pytest.param("172.16.5.4", id="private_172_case"),
        pytest.param("192.168.1.1", id="private_192_case"),
        pytest.param("169.254.169.254", id="cloud_metadata_case"),
        pytest.param("100.64.0.1", id="shared_address_space_case"),
        pytest.param("0.0.0.0", id="unspecified_case"),
        pytest.param("224.0.0.1", id="multicast_case"),
        pytest.param("240.0.0.1", id="reserved_case"),
        pytest.param("255.255.255.255", id="broadcast_case"),
        pytest.param("[::1]", id="ipv6_loopback_case"),
        pytest.param("[::]", id="ipv6_unspecified_case"),
        pytest.param("[fe80::1]", id="ipv6_link_local_case"),
        pytest.param("[fd00:ec2::254]", id="ipv6_unique_local_metadata_case"),
        pytest.param("[::ffff:127.0.0.1]", id="ipv4_mapped_loopback_case"),
        pytest.param("[::ffff:169.254.169.254]", id="ipv4_mapped_metadata_case"),
        pytest.param("[64:ff9b::a00:1]", id="nat64_private_case"),
        pytest.param("[2002:a00:1::1]", id="sixtofour_private_case"),
        pytest.param("localhost", id="localhost_case"),
        pytest.param("LocalHost.", id="localhost_dot_case"),
        pytest.param("api.localhost", id="localhost_subdomain_case"),
        pytest.param("127.1", id="short_ipv4_case"),
        pytest.param("0x7f000001", id="hex_ipv4_case"),
        pytest.param("2130706433", id="decimal_ipv4_case"),
        pytest.param("0177.0.0.1", id="octal_ipv4_case"),
    ],
)
def test_validate_url_rejects_internal_hosts(host):
    with pytest.raises(FetchError) as caught:
        validate_url(f"http://{host}/latest/meta-data/")

    assert caught.value.code == "forbidden_address"
    assert caught.value.is_transient is False


def test_validate_url_lets_allowed_hosts_through(settings):
    settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS = ["127.0.0.1:8080", "localhost:9000"]

    assert validate_url("http://127.0.0.1:8080/doc") == "http://127.0.0.1:8080/doc"
    assert validate_url("http://localhost:9000/doc") == "http://localhost:9000/doc"
    with pytest.raises(FetchError) as caught:
        validate_url("http://127.0.0.1:8081/doc")
    assert caught.value.code == "forbidden_address"


@pytest.mark.parametrize(
    ("address", "is_public"),
    [
        pytest.param("8.8.8.8", True, id="public_v4_case"),
        pytest.param("2606:4700:4700::1111", True, id="public_v6_case"),
        pytest.param("64:ff9b::808:808", True, id="nat64_public_case"),
        pytest.param("192.0.2.1", False, id="documentation_case"),
        pytest.param("198.18.0.1", False, id="benchmarking_case"),
        pytest.param("ff02::1", False, id="ipv6_multicast_case"),
    ],
)
def test_is_public_address(address, is_public):
    assert is_public_address(ipaddress.ip_address(address)) is is_public


# ---------------------------------------------------------------------------------------------
# Resolution at connect time


def test_fetch_refuses_a_host_name_that_resolves_to_loopback(document_server, fake_dns):
    fake_dns.names["innocent.example"] = ["127.0.0.1"]

    with pytest.raises(FetchError) as caught:
        fetch_url(f"http://innocent.example:{document_server.port}/docs/refund%20policy.txt", max_bytes=1000)

    assert caught.value.code == "forbidden_address"
    assert caught.value.is_transient is False
    assert "innocent.example resolves to 127.0.0.1" in caught.value.message
    assert document_server.requests == []


def test_fetch_refuses_a_host_name_with_any_internal_address(document_server, fake_dns):
    fake_dns.names["mixed.example"] = ["93.184.216.34", "10.1.2.3"]

    with pytest.raises(FetchError) as caught:
        fetch_url("http://mixed.example/", max_bytes=1000)

    assert caught.value.code == "forbidden_address"
    assert "10.1.2.3" in caught.value.message


def test_fetch_refuses_a_literal_internal_address_without_connecting(document_server):
    with pytest.raises(FetchError) as caught:
        fetch_url("http://169.254.169.254/latest/meta-data/", max_bytes=1000)

    assert caught.value.code == "forbidden_address"


def test_fetch_of_an_unknown_host_name_is_a_permanent_connection_error(fake_dns):
    with pytest.raises(FetchError) as caught:
        fetch_url("http://no-such-host.example/", max_bytes=1000)

    assert caught.value.code == "connection_error"
    assert caught.value.is_transient is False
    assert "could not be resolved" in caught.value.message


def test_fetch_connects_to_the_address_it_checked_and_sends_the_host_name(document_server, fake_dns):
    fake_dns.names["docs.example"] = ["127.0.0.1"]

    fetched = fetch_url(f"http://docs.example:{document_server.port}/docs/refund%20policy.txt", max_bytes=1000)

    assert fetched.content == DOCUMENT
    assert fake_dns.lookups == ["docs.example"]  # one lookup: nothing left to rebind
    assert document_server.requests[0]["host"] == f"docs.example:{document_server.port}"


# ---------------------------------------------------------------------------------------------
# Fetching from an allowed local server


def test_fetch_returns_the_document(document_server):
    fetched = fetch_url(f"{document_server.url}/docs/refund%20policy.txt", max_bytes=1000)

    assert fetched == Fetched(
        url=f"{document_server.url}/docs/refund%20policy.txt",
        content=DOCUMENT,
        content_type="text/plain; charset=utf-8",
        filename="refund policy.txt",
    )
    assert document_server.requests == [
        {
            "path": "/docs/refund%20policy.txt",
            "host": f"127.0.0.1:{document_server.port}",
            "user_agent": USER_AGENT,
            "encoding": "identity",
        }
    ]


def test_fetch_follows_redirects_to_the_final_url(document_server):
    fetched = fetch_url(f"{document_server.url}/relative-redirect", max_bytes=1000)

    assert fetched.url == f"{document_server.url}/docs/refund%20policy.txt"
    assert fetched.content == DOCUMENT
    assert [request["path"] for request in document_server.requests] == [
        "/relative-redirect",
        "/docs/refund%20policy.txt",
    ]


def test_fetch_accepts_a_body_of_exactly_max_bytes(document_server):
    fetched = fetch_url(f"{document_server.url}/big-without-length", max_bytes=len(BIG_BODY))

    assert fetched.content == BIG_BODY
    assert fetched.content_type == ""
    assert fetched.filename == "big-without-length"


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("http://10.0.0.1/", id="private_literal_case"),
        pytest.param("http://169.254.169.254/latest/meta-data/", id="metadata_case"),
        pytest.param("http://localhost/admin", id="localhost_case"),
        pytest.param("file:///etc/passwd", id="file_scheme_case"),
    ],
)
def test_fetch_refuses_redirects_to_forbidden_urls(document_server, target):
    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/redirect?to={target}", max_bytes=1000)

    assert caught.value.code in ("forbidden_address", "invalid_url")
    assert caught.value.code == ("invalid_url" if target.startswith("file") else "forbidden_address")
    assert [request["path"] for request in document_server.requests] == [f"/redirect?to={target}"]


def test_fetch_refuses_a_redirect_to_a_loopback_port_not_allowed(document_server, refused_port):
    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/redirect?to=http://127.0.0.1:{refused_port}/", max_bytes=1000)

    assert caught.value.code == "forbidden_address"


def test_fetch_refuses_a_redirect_to_a_name_that_resolves_inside(document_server, fake_dns):
    fake_dns.names["rebound.example"] = ["192.168.0.10"]

    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/redirect?to=http://rebound.example/", max_bytes=1000)

    assert caught.value.code == "forbidden_address"
    assert len(document_server.requests) == 1


def test_fetch_stops_after_max_redirects(document_server):
    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/loop", max_bytes=1000, max_redirects=2)

    assert caught.value.code == "too_many_redirects"
    assert caught.value.is_transient is False
    assert len(document_server.requests) == 3


@pytest.mark.parametrize("path", ["/big", "/big-without-length"], ids=["content_length_case", "no_length_case"])
def test_fetch_refuses_bodies_over_max_bytes(document_server, path):
    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}{path}", max_bytes=1000)

    assert caught.value.code == "too_large"
    assert caught.value.is_transient is False
    assert "larger than 1000 bytes" in caught.value.message


@pytest.mark.parametrize(
    ("status", "is_transient"),
    [
        pytest.param(404, False, id="404_case"),
        pytest.param(403, False, id="403_case"),
        pytest.param(429, True, id="429_case"),
        pytest.param(500, True, id="500_case"),
        pytest.param(503, True, id="503_case"),
    ],
)
def test_fetch_http_errors(document_server, status, is_transient):
    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/status/{status}", max_bytes=1000)

    assert caught.value.code == "http_error"
    assert caught.value.is_transient is is_transient
    assert caught.value.status_code == status
    assert f"HTTP {status}" in caught.value.message


def test_fetch_from_a_server_that_never_answers_times_out(silent_port):
    started = time.monotonic()

    with pytest.raises(FetchError) as caught:
        fetch_url(f"http://127.0.0.1:{silent_port}/doc.txt", max_bytes=1000, timeout_s=1.5)

    elapsed = time.monotonic() - started
    assert caught.value.code == "timeout"
    assert caught.value.is_transient is True
    assert 1.4 < elapsed < 2.5


def test_fetch_of_a_trickling_body_times_out_at_the_deadline(document_server):
    started = time.monotonic()

    with pytest.raises(FetchError) as caught:
        fetch_url(f"{document_server.url}/trickle", max_bytes=10_000, timeout_s=1.5)

    assert caught.value.code == "timeout"
    assert time.monotonic() - started < 2.5


def test_fetch_from_a_closed_port_is_a_transient_connection_error(settings, refused_port):
    settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS = [f"127.0.0.1:{refused_port}"]

    with pytest.raises(FetchError) as caught:
        fetch_url(f"http://127.0.0.1:{refused_port}/", max_bytes=1000)

    assert caught.value.code == "connection_error"
    assert caught.value.is_transient is True
    assert "Connection refused" in caught.value.message


# ---------------------------------------------------------------------------------------------
# TLS on a pinned connection


def _self_signed(host_name: str) -> tuple[bytes, bytes]:
    """A certificate for ``host_name`` and its private key, both PEM."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def tls_server(tmp_path, settings, fake_dns, monkeypatch) -> Iterator[tuple[int, list[str]]]:
    """An HTTPS document server on 127.0.0.1 with a certificate for docs.example, trusted by the fetcher.

    Yields its port and the SNI names its clients sent.
    """
    certificate, key = _self_signed("docs.example")
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    server_names: list[str] = []
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_context.sni_callback = lambda _socket, name, _context: server_names.append(name)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = server_context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    server.record = DocumentServer(url=f"https://docs.example:{port}", port=port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake_dns.names["docs.example"] = ["127.0.0.1"]
    fake_dns.names["impostor.example"] = ["127.0.0.1"]
    settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS = [f"docs.example:{port}", f"impostor.example:{port}"]
    monkeypatch.setattr(fetching, "_ssl_context", lambda: ssl.create_default_context(cadata=certificate.decode()))
    yield port, server_names
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_fetch_over_https_verifies_the_certificate_of_the_host_name_on_the_pinned_address(tls_server):
    port, server_names = tls_server

    fetched = fetch_url(f"https://docs.example:{port}/docs/refund%20policy.txt", max_bytes=1000)

    assert fetched.content == DOCUMENT
    assert server_names == ["docs.example"]


def test_fetch_over_https_refuses_a_certificate_for_another_name(tls_server):
    port, _ = tls_server

    with pytest.raises(FetchError) as caught:
        fetch_url(f"https://impostor.example:{port}/docs/refund%20policy.txt", max_bytes=1000)

    assert caught.value.code == "connection_error"
    assert "certificate verify failed" in caught.value.message
