"""The one guard for outbound connections to tenant-configured URLs (SSRF).

Model servers, vLLM pools, embedders and rerankers are URLs a tenant types in; the workers that
call them sit inside our network. Every such URL passes two checks:

1. ``validate_outbound_url`` when the configuration is saved: http(s), a host, no credentials,
   query or fragment, and a host that is not (and does not resolve to) an internal address.
2. The connection itself, through the clients this module builds (httpx, sync and async, and
   aiohttp): the host name is resolved once, *every* address is checked, and the socket is
   opened to exactly the checked addresses — no second lookup for DNS rebinding to answer
   differently; a redirect or a pooled reconnect goes through the same check.

Internal means not globally routable: loopback, private, link-local (cloud metadata at
169.254.169.254 and fd00:ec2::254), shared, reserved, multicast, and the IPv6 forms that carry
one of those (mapped, NAT64, 6to4, Teredo). Self-hosted model servers on private networks are
reached by the operator listing them in ``PARLEY_OUTBOUND_ALLOWLIST`` (networks in CIDR form,
or host names): the development and test environments list loopback there for the mock server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import types
import typing
from functools import cache
from urllib.parse import urlsplit

import aiohttp
import httpcore
import httpx
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

MAX_URL_LENGTH = 2048
_NAT64_NETWORK = ipaddress.IPv6Network("64:ff9b::/96")  # the IPv4 address in the last 32 bits
_LOCAL_NAT64_NETWORK = ipaddress.IPv6Network("64:ff9b:1::/48")  # operator-chosen embedding: refused
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT, not is_private on 3.11

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class OutboundRefused(Exception):
    """A tenant-configured URL or the address it leads to may not be reached."""


class ResolutionFailed(Exception):
    """A host name did not resolve (a connection error, not a refusal)."""


def is_public_address(address: IPAddress) -> bool:
    """Whether ``address`` is globally routable: not private, loopback, link-local, multicast, reserved, …

    IPv6 addresses that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by it too.
    """
    if isinstance(address, ipaddress.IPv6Address):
        # Mapped and NAT64 addresses reach exactly the IPv4 address they carry.
        translated = address.ipv4_mapped
        if translated is None and address in _NAT64_NETWORK:
            translated = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if translated is not None:
            return is_public_address(translated)
        # 6to4 and Teredo tunnel to the IPv4 address they carry: both must be public.
        tunnelled = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if (tunnelled is not None and not is_public_address(tunnelled)) or address in _LOCAL_NAT64_NETWORK:
            return False
    elif address in _SHARED_ADDRESS_SPACE:
        return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast  # 224.0.0.0/4 counts as global on Python 3.11
        or address.is_reserved
        or address.is_unspecified
    )


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one, including the legacy IPv4 forms resolvers accept ("127.1", "0x7f.1")."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(character in "0123456789abcdefxABCDEFX." for character in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


class Allowlist(typing.NamedTuple):
    networks: tuple[IPNetwork, ...]
    hosts: frozenset[str]

    def allows(self, host: str, address: IPAddress | None = None) -> bool:
        if _normal_host(host) in self.hosts:
            return True
        return address is not None and any(address in network for network in self.networks)


@cache
def _allowlist_of(entries: tuple[str, ...]) -> Allowlist:
    networks: list[IPNetwork] = []
    hosts: set[str] = set()
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            if "/" in entry or ":" in entry:
                raise ImproperlyConfigured(
                    f"PARLEY_OUTBOUND_ALLOWLIST: {entry!r} is neither a network (CIDR) nor a host name."
                ) from None
            hosts.add(_normal_host(entry))
    return Allowlist(networks=tuple(networks), hosts=frozenset(hosts))


def allowlist() -> Allowlist:
    """The operator's ``PARLEY_OUTBOUND_ALLOWLIST``, parsed (once per distinct value)."""
    return _allowlist_of(tuple(getattr(settings, "PARLEY_OUTBOUND_ALLOWLIST", ())))


def check_address(host: str, address: IPAddress, allowed: Allowlist | None = None) -> None:
    """Refuse ``address`` (one that ``host`` resolved to) unless it is public or allow-listed."""
    allowed = allowed or allowlist()
    if not is_public_address(address) and not allowed.allows(host, address):
        raise OutboundRefused(f"{host} resolves to {address}, which is not a public address.")


def _addresses_of(infos: list) -> list[IPAddress]:
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonical, sockaddr in infos:
        # IPv6 link-local answers carry a scope ("fe80::1%eth0"); they are refused anyway.
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def resolve_checked(host: str, port: int) -> list[IPAddress]:
    """``host``'s addresses, each checked; :class:`OutboundRefused` if any is internal."""
    literal = literal_address(_normal_host(host))
    if literal is not None:
        check_address(host, literal)
        return [literal]
    try:
        addresses = _addresses_of(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except socket.gaierror as error:
        raise ResolutionFailed(f"The host name {host} could not be resolved: {error.strerror}.") from None
    _check_all(host, addresses)
    return addresses


async def resolve_checked_async(host: str, port: int) -> list[IPAddress]:
    """``resolve_checked`` on the running loop's resolver."""
    literal = literal_address(_normal_host(host))
    if literal is not None:
        check_address(host, literal)
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ResolutionFailed(f"The host name {host} could not be resolved: {error.strerror}.") from None
    addresses = _addresses_of(infos)
    _check_all(host, addresses)
    return addresses


def _check_all(host: str, addresses: list[IPAddress]) -> None:
    if not addresses:
        raise ResolutionFailed(f"The host name {host} has no addresses.")
    allowed = allowlist()
    for address in addresses:
        check_address(host, address, allowed)


# ---------------------------------------------------------------------------------------------
# Checking a URL when it is configured


def validate_outbound_url(url: object, *, resolve: bool = False) -> str:
    """``url`` stripped of surrounding space and trailing slashes, if a tenant may configure it as
    a base URL; :class:`OutboundRefused` with a message for the tenant if not.

    Offline by default (registries validate stored configurations on every use). ``resolve``:
    also look the host name up — for the services that save a configuration (a name that does not
    resolve here passes; the connection checks it again in any case)."""
    if not isinstance(url, str) or not url.strip():
        raise OutboundRefused("must be an http(s) URL.")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH or any(character.isspace() or ord(character) < 32 for character in url):
        raise OutboundRefused("must be an http(s) URL.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise OutboundRefused("must be an http(s) URL.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundRefused("must be an http(s) URL.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        # The URL ends up in logs, error messages and cache keys; keys have their own fields.
        raise OutboundRefused("must not contain credentials; put the key in 'api_key'.")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise OutboundRefused("must not have a query or fragment.")
    host = _normal_host(parts.hostname)
    port = port or (443 if parts.scheme == "https" else 80)
    allowed = allowlist()
    if not allowed.allows(host):
        literal = literal_address(host)
        if literal is not None:
            if not is_public_address(literal) and not allowed.allows(host, literal):
                raise OutboundRefused(f"points to {host}, which is not a public address.")
        elif host == "localhost" or host.endswith(".localhost"):
            raise OutboundRefused(f"points to {host}, which is not a public address.")
        elif resolve:
            try:
                addresses = _addresses_of(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
            except (socket.gaierror, UnicodeError):
                addresses = []
            for address in addresses:
                if not is_public_address(address) and not allowed.allows(host, address):
                    raise OutboundRefused(f"points to {host}, which resolves to an address that is not public.")
    return url.rstrip("/")


# ---------------------------------------------------------------------------------------------
# Clients whose connections are checked and pinned


class _GuardedSyncBackend:
    """An httpcore network backend that connects only to checked addresses. ``core`` is the
    httpcore package of the httpx in use (httpx, or the openai SDK's httpx2 with httpcore2): its
    streams and its ConnectError, which that httpx maps to its own."""

    def __init__(self, core: types.ModuleType) -> None:
        self._core = core
        self._backend = core.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout=None, local_address=None, socket_options=None) -> typing.Any:
        try:
            addresses = resolve_checked(host, port)
        except (OutboundRefused, ResolutionFailed) as error:
            raise self._core.ConnectError(str(error)) from None
        last_error: Exception | None = None
        for address in addresses:
            try:
                return self._backend.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (self._core.ConnectError, self._core.ConnectTimeout) as error:
                last_error = error  # the host's next address
        assert last_error is not None
        raise last_error

    def connect_unix_socket(self, path, timeout=None, socket_options=None) -> typing.Any:
        raise self._core.ConnectError("Unix sockets are not reachable from tenant-configured URLs.")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _GuardedAsyncBackend:
    """``_GuardedSyncBackend`` for async pools."""

    def __init__(self, core: types.ModuleType) -> None:
        self._core = core
        self._backend = core.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout=None,  # noqa: ASYNC109 - httpcore's backend interface
        local_address=None,
        socket_options=None,
    ) -> typing.Any:
        try:
            addresses = await resolve_checked_async(host, port)
        except (OutboundRefused, ResolutionFailed) as error:
            raise self._core.ConnectError(str(error)) from None
        last_error: Exception | None = None
        for address in addresses:
            try:
                return await self._backend.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except (self._core.ConnectError, self._core.ConnectTimeout) as error:
                last_error = error
        assert last_error is not None
        raise last_error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None) -> typing.Any:  # noqa: ASYNC109
        raise self._core.ConnectError("Unix sockets are not reachable from tenant-configured URLs.")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


def _flavour(library: str) -> tuple[typing.Any, types.ModuleType]:
    """httpx and its httpcore, or (for the openai SDK's clients) httpx2 and httpcore2."""
    if library == "httpx2":
        import httpcore2
        import httpx2

        return httpx2, httpcore2
    return httpx, httpcore


def guarded_transport(*, verify: typing.Any = True, limits: typing.Any = None, library: str = "httpx") -> typing.Any:
    """httpx's transport with its pool on the guarded backend (httpx takes no backend parameter:
    replacing ``_pool`` keeps the rest of its request handling and exception mapping).
    ``library="httpx2"`` for the openai SDK's ``http_client``."""
    client_library, core = _flavour(library)
    limits = limits or client_library.Limits(max_connections=100, max_keepalive_connections=20)
    transport = client_library.HTTPTransport(verify=verify, trust_env=False, limits=limits)
    return _on_guarded_pool(transport, core.ConnectionPool, _GuardedSyncBackend(core), limits)


def guarded_async_transport(
    *, verify: typing.Any = True, limits: typing.Any = None, library: str = "httpx"
) -> typing.Any:
    """``guarded_transport`` for an async client."""
    client_library, core = _flavour(library)
    limits = limits or client_library.Limits(max_connections=1000, max_keepalive_connections=100)
    transport = client_library.AsyncHTTPTransport(verify=verify, trust_env=False, limits=limits)
    return _on_guarded_pool(transport, core.AsyncConnectionPool, _GuardedAsyncBackend(core), limits)


def _on_guarded_pool(
    transport: typing.Any, pool_class: typing.Any, backend: typing.Any, limits: typing.Any
) -> typing.Any:
    transport._pool = pool_class(
        ssl_context=transport._pool._ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return transport


class GuardedTCPConnector(aiohttp.TCPConnector):
    """aiohttp's connector, every resolved address checked before it is connected to.

    aiohttp connects to exactly the addresses ``_resolve_host`` returns (IP literals included,
    which skip the resolver), so checking them there pins the connection to what was checked.
    """

    async def _resolve_host(self, host: str, port: int, traces=None):
        results = await super()._resolve_host(host, port, traces=traces)
        allowed = allowlist()
        for result in results:
            address = ipaddress.ip_address(str(result["host"]).split("%", 1)[0])
            try:
                check_address(host, address, allowed)
            except OutboundRefused as error:
                raise aiohttp.ClientConnectionError(str(error)) from None
        return results
