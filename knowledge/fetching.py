"""Fetching tenant-supplied URLs without letting tenants reach inside our network (SSRF).

The guard sits where the socket is opened, not in front of the request: a custom httpcore
network backend resolves the host name once, refuses the connection if *any* address is not
globally routable, and connects to exactly the addresses it checked. There is no second DNS
lookup for an attacker's name server to answer differently (DNS rebinding), every redirect hop
and every reused connection goes through the same check, and TLS still verifies the
certificate and sends SNI for the host name in the URL, because TLS starts on top of the
already-pinned TCP stream. Proxies from the environment are ignored (``trust_env=False``): a
proxy would resolve the name itself, behind our back.

The same backend enforces the whole-fetch deadline: every connect, read and write is given at
most the time left, so a server that accepts and then stalls, or trickles a byte at a time,
fails at the deadline.

Residual risk: the DNS lookup itself (``socket.getaddrinfo``) cannot be given a timeout; a
slow resolver can delay a fetch past its deadline by the resolver's own timeout.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
import typing
from dataclasses import dataclass
from functools import cache
from urllib.parse import unquote, urlsplit

import httpcore
import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

# The address rules are the outbound guard's, shared by every tenant-supplied URL.
from tenants.outbound import is_public_address, literal_address

USER_AGENT = "ParleyBot/1.0 (+knowledge ingestion)"
MAX_URL_LENGTH = 2048
CONNECT_TIMEOUT_SECONDS = 5.0
READ_CHUNK_BYTES = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
TRANSIENT_STATUSES = frozenset({408, 425, 429})  # plus every 5xx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(Exception):
    """A URL could not be fetched. ``code`` says why; ``is_transient``: worth retrying later.

    Codes: ``invalid_url``, ``forbidden_address``, ``timeout``, ``too_large``, ``http_error``,
    ``connection_error``, ``too_many_redirects``.
    """

    def __init__(self, message: str, *, code: str, is_transient: bool = False, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.is_transient = is_transient
        self.status_code = status_code  # of an http_error


@dataclass(frozen=True, slots=True)
class Fetched:
    url: str  # the final URL, after redirects
    content: bytes
    content_type: str  # the Content-Type header, possibly empty
    filename: str  # the last segment of the final URL's path, possibly empty


# ---------------------------------------------------------------------------------------------
# Addresses


_literal_address = literal_address


def _allowed_hosts() -> frozenset[tuple[str, int]]:
    """``KNOWLEDGE_FETCH_ALLOWED_HOSTS`` ("host:port" strings) as (host, port) pairs."""
    allowed = set()
    for entry in getattr(settings, "KNOWLEDGE_FETCH_ALLOWED_HOSTS", []):
        host, _, port = str(entry).rpartition(":")
        if not host or not port.isdigit():
            raise ImproperlyConfigured(f"KNOWLEDGE_FETCH_ALLOWED_HOSTS: {entry!r} is not a 'host:port' string.")
        allowed.add((_normal_host(host), int(port)))
    return frozenset(allowed)


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _is_allowed(host: str, port: int, allowed: frozenset[tuple[str, int]]) -> bool:
    return (_normal_host(host), port) in allowed


# ---------------------------------------------------------------------------------------------
# URL checks


def validate_url(url: str) -> str:
    """``url`` (stripped) if it is an http(s) URL we may try to fetch; :class:`FetchError` if not.

    Cheap and offline — for the API request path: checks the syntax, refuses credentials, and
    refuses hosts that are plainly internal (private IP literals, ``localhost``). Host names are
    resolved and checked only when fetching.
    """
    if not isinstance(url, str):
        raise FetchError("The URL must be a string.", code="invalid_url")
    url = url.strip()
    if not url:
        raise FetchError("The URL is empty.", code="invalid_url")
    if len(url) > MAX_URL_LENGTH:
        raise FetchError(f"The URL is longer than {MAX_URL_LENGTH} characters.", code="invalid_url")
    if any(character.isspace() or ord(character) < 32 or ord(character) == 127 for character in url):
        raise FetchError("The URL contains spaces or control characters.", code="invalid_url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise FetchError(f"The URL is not valid: {error}.", code="invalid_url") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise FetchError("Only http and https URLs can be fetched.", code="invalid_url")
    host = parts.hostname
    if not host:
        raise FetchError("The URL has no host.", code="invalid_url")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise FetchError("URLs with credentials (user:password@) cannot be fetched.", code="invalid_url")
    port = port or DEFAULT_PORTS[scheme]
    if not _is_allowed(host, port, _allowed_hosts()):
        name = _normal_host(host)
        address = _literal_address(name)
        if (
            (address is not None and not is_public_address(address))
            or name == "localhost"
            or name.endswith(".localhost")
        ):
            raise FetchError(f"The address {host} is not public; it cannot be fetched.", code="forbidden_address")
    return url


# ---------------------------------------------------------------------------------------------
# The guarded network backend


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation gets at most the time left before the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def _time_left(self, timeout: float | None, error: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise error("The fetch deadline has passed.")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._time_left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._time_left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        stream = self._stream.start_tls(ssl_context, server_hostname, self._time_left(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._stream.get_extra_info(info)


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves, checks and pins every TCP connection; applies the fetch deadline."""

    def __init__(self, *, deadline: float, allowed_hosts: frozenset[tuple[str, int]]) -> None:
        self._backend = httpcore.SyncBackend()
        self._deadline = deadline
        self._allowed_hosts = allowed_hosts

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self._checked_addresses(host, port)
        last_error: Exception | None = None
        for address in addresses:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise httpcore.ConnectTimeout("The fetch deadline has passed.")
            try:
                stream = self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=left if timeout is None else min(timeout, left),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as error:
                last_error = error  # try the host's next address, as browsers do
                continue
            return _DeadlineStream(stream, self._deadline)
        assert last_error is not None
        raise last_error

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise FetchError("Unix sockets cannot be fetched.", code="forbidden_address")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)

    def _checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise FetchError(
                f"The host name {host} could not be resolved: {error.strerror}.",
                code="connection_error",
                is_transient=error.errno == socket.EAI_AGAIN,
            ) from None
        addresses: list[IPAddress] = []
        for _family, _type, _proto, _canonical, sockaddr in infos:
            # IPv6 link-local answers carry a scope ("fe80::1%eth0"); they are refused anyway.
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise FetchError(f"The host name {host} has no addresses.", code="connection_error")
        if not _is_allowed(host, port, self._allowed_hosts):
            internal = [address for address in addresses if not is_public_address(address)]
            if internal:
                raise FetchError(
                    f"{host} resolves to {internal[0]}, which is not a public address; it cannot be fetched.",
                    code="forbidden_address",
                )
        return addresses


class _GuardedTransport(httpx.HTTPTransport):
    """httpx's own transport with the connection pool rebuilt on the guarded backend.

    httpx offers no parameter for a network backend; replacing ``_pool`` keeps every other part
    of its request handling (and its exception mapping) as it is.
    """

    def __init__(self, backend: _GuardedBackend) -> None:
        super().__init__(verify=_ssl_context(), trust_env=False)
        self._pool = httpcore.ConnectionPool(
            ssl_context=_ssl_context(),
            max_connections=4,
            max_keepalive_connections=4,
            network_backend=backend,
        )


@cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle costs milliseconds; one context serves every fetch.
    return httpx.create_ssl_context(trust_env=False)


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch_url(url: str, *, max_bytes: int, timeout_s: float = 20.0, max_redirects: int = 5) -> Fetched:
    """GET ``url`` and return the body, following up to ``max_redirects`` redirects, each one checked.

    Refuses URLs whose host is or resolves to a non-public address (unless listed, as
    "host:port", in ``settings.KNOWLEDGE_FETCH_ALLOWED_HOSTS``), bodies over ``max_bytes``, and
    fetches that take longer than ``timeout_s`` in all. Raises :class:`FetchError`.
    """
    current = validate_url(url)
    deadline = time.monotonic() + timeout_s
    backend = _GuardedBackend(deadline=deadline, allowed_hosts=_allowed_hosts())
    client = httpx.Client(
        transport=_GuardedTransport(backend),
        trust_env=False,
        follow_redirects=False,
        # The backend caps every operation at the time left; these are the per-operation ceilings.
        timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_SECONDS, timeout_s)),
        headers={
            "User-Agent": USER_AGENT,
            # Uncompressed: max_bytes then bounds what arrives, and no small gzip bomb inflates in memory.
            "Accept-Encoding": "identity",
        },
    )
    with client:
        for _hop in range(max_redirects + 1):
            try:
                with client.stream("GET", current) as response:
                    if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                        current = _redirect_target(response)
                        continue
                    _check_status(response)
                    content = _read_body(response, max_bytes=max_bytes, deadline=deadline)
                    return Fetched(
                        url=str(response.url),
                        content=content,
                        content_type=response.headers.get("content-type", ""),
                        filename=unquote(urlsplit(str(response.url)).path.rsplit("/", 1)[-1]),
                    )
            except httpx.ConnectTimeout:
                raise FetchError(
                    f"Could not connect to {current} in time.", code="timeout", is_transient=True
                ) from None
            except httpx.TimeoutException:
                raise FetchError(
                    f"Fetching {current} took longer than {timeout_s:g} s.", code="timeout", is_transient=True
                ) from None
            except httpx.InvalidURL as error:
                raise FetchError(f"The URL {current} is not valid: {error}.", code="invalid_url") from None
            except httpx.TransportError as error:  # refused, reset, TLS failures, malformed answers
                raise FetchError(
                    f"Could not fetch {current}: {error or type(error).__name__}.",
                    code="connection_error",
                    is_transient=True,
                ) from None
    raise FetchError(f"Fetching {url} was redirected more than {max_redirects} times.", code="too_many_redirects")


def _redirect_target(response: httpx.Response) -> str:
    try:
        target = str(response.url.join(response.headers["location"]))
    except httpx.InvalidURL as error:
        raise FetchError(f"{response.url} redirected to an invalid URL: {error}.", code="invalid_url") from None
    return validate_url(target)


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400 and status not in REDIRECT_STATUSES:
        return
    is_transient = status >= 500 or status in TRANSIENT_STATUSES
    reason = response.reason_phrase or "error"
    raise FetchError(
        f"{response.url} answered HTTP {status} {reason}.",
        code="http_error",
        is_transient=is_transient,
        status_code=status,
    )


def _read_body(response: httpx.Response, *, max_bytes: int, deadline: float) -> bytes:
    too_large = FetchError(f"{response.url} is larger than {max_bytes} bytes.", code="too_large")
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    for chunk in response.iter_bytes(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > max_bytes:
            raise too_large
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("The fetch deadline has passed.")
    return bytes(body)
