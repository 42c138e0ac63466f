"""DRF authentication for the four kinds of caller, each bound to the request's tenant.

Every class returns ``(user, AuthContext)``; permissions read scopes from the AuthContext, so an
endpoint checks "may this caller do X in this tenant" the same way whoever the caller is.
"""

from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.utils import timezone
from oauth2_provider.contrib.rest_framework import OAuth2Authentication
from rest_framework.authentication import SessionAuthentication, get_authorization_header
from rest_framework.request import Request
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import InvalidToken, TokenError

from tenants.config_epoch import EPOCH_KEY
from tenants.errors import AuthenticationFailed, ParleyError, TenantSuspended
from tenants.models import ApiKey, Membership, Tenant, User
from tenants.redis import get_redis
from tenants.resolution import (
    ApiKeyRecord,
    api_key_resolve,
    resolution_cache_keys,
    tenant_and_key_resolve_async,
    tenant_hostname,
)
from tenants.services import api_key_hash, api_key_parse_prefix

ALL_SCOPES = frozenset(ApiKey.Scope.values)
ROLE_SCOPES: dict[str, frozenset[str]] = {
    Membership.Role.OWNER: ALL_SCOPES,
    Membership.Role.ADMIN: ALL_SCOPES,
    Membership.Role.MEMBER: frozenset({ApiKey.Scope.CHAT, ApiKey.Scope.KNOWLEDGE_READ}),
}
LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most once a minute per key


@dataclass(frozen=True)
class AuthContext:
    kind: str  # "api_key" | "jwt" | "oauth2" | "session"
    tenant: Tenant
    scopes: frozenset[str]
    api_key_id: int | None = None
    extra: dict = field(default_factory=dict)


class ApiKeyUser:
    """The principal behind an API key: authenticated, but no person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None
    id = None

    def __init__(self, record: ApiKeyRecord) -> None:
        self.record = record

    def __str__(self) -> str:
        return f"api-key:{self.record.prefix}"


def _bearer_token(request: Request) -> str | None:
    header = get_authorization_header(request).split()
    if len(header) != 2 or header[0].lower() != b"bearer":
        return None
    try:
        return header[1].decode("ascii")
    except UnicodeDecodeError:
        return None


def _tenant_of(request: Request) -> Tenant | None:
    tenant = getattr(request, "tenant", None)
    if tenant is None or tenant.schema_name == "public":
        return None
    return tenant


def membership_scopes(user: User, tenant: Tenant) -> frozenset[str] | None:
    role = Membership.objects.filter(user=user, tenant_id=tenant.pk).values_list("role", flat=True).first()
    return ROLE_SCOPES.get(role) if role else None


class ApiKeyAuthentication:
    """``Authorization: Bearer prly_…``. Verified against the cached key record (no DB hit)."""

    www_authenticate_realm = "api"

    def authenticate(self, request: Request):
        raw_key = _bearer_token(request)
        if raw_key is None or api_key_parse_prefix(raw_key) is None:
            return None  # not an API key: let JWT / OAuth2 try
        record = getattr(request._request, "api_key_record", None)
        client_ip = request._request.META.get("REMOTE_ADDR", "")
        return api_key_verify(raw_key, tenant=_tenant_of(request), record=record, client_ip=client_ip)

    def authenticate_header(self, request: Request) -> str:
        return f'Bearer realm="{self.www_authenticate_realm}"'


def api_key_verify(raw_key: str, *, tenant: Tenant | None, record: ApiKeyRecord | None = None, client_ip: str = ""):
    """Check a raw API key against its cached record for ``tenant``: ``(ApiKeyUser, AuthContext)``
    or AuthenticationFailed — DRF's side of ``api_key_verify_async`` (the same checks:
    ``_api_key_check``).

    Guessing a key's secret is throttled per key prefix and client address: after too many wrong
    secrets that client gets 429 for that key, while the key keeps working from elsewhere.
    """
    from billing.ratelimit import auth_failure_register, auth_failures_exceeded

    prefix = api_key_parse_prefix(raw_key)
    record = record or (api_key_resolve(prefix) if prefix else None)
    identity = _throttle_identity(prefix, client_ip)
    retry_after = auth_failures_exceeded(identity=identity) if record is not None else None
    try:
        result = _api_key_check(raw_key, tenant=tenant, record=record, retry_after=retry_after)
    except _WrongSecret:
        auth_failure_register(identity=identity)
        raise AuthenticationFailed("Invalid API key.", code="invalid_api_key") from None
    _touch(result[0].record, timezone.now())
    return result


class _WrongSecret(Exception):
    """The key's prefix is known but its secret is not: a failure the brute-force limit counts."""


def _api_key_check(raw_key: str, *, tenant: Tenant | None, record: ApiKeyRecord | None, retry_after: float | None):
    """The one check of a presented API key, its throttle state already read: the caller's
    transport (DRF, or the async edge and WebSocket) only does the I/O around it."""
    if api_key_parse_prefix(raw_key) is None or record is None:
        raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
    _refuse_if_throttled(retry_after)
    if not hmac.compare_digest(record.secret_hash, api_key_hash(raw_key)):
        raise _WrongSecret
    return _accepted(record, tenant)


def _throttle_identity(prefix: str | None, client_ip: str) -> str:
    """Who the brute-force limit counts failures of: one client address guessing one key."""
    return f"{prefix}:{client_ip}"


async def api_key_authenticate_async(raw_key: str, *, host: str, client_ip: str, redis):
    """The async edge's (chat.transports.openai_edge) tenant and API key in one Redis round trip:
    the resolution cache, the configuration epoch and the brute-force limit's state together;
    then ``api_key_verify``'s checks. Returns ``(tenant, epoch, AuthContext)``; the accepted key is
    remembered in this process (``api_key_known``)."""
    from billing.ratelimit import auth_failures_peek_queue, auth_failures_retry_after

    prefix = api_key_parse_prefix(raw_key)
    identity = _throttle_identity(prefix, client_ip)
    hostname = tenant_hostname(host)
    resolved = await tenant_and_key_resolve_async(
        hostname, prefix, redis, also=lambda pipe: auth_failures_peek_queue(pipe, identity)
    )
    tenant, record = resolved.tenant, resolved.record
    if tenant is None and record is not None:
        tenant = record.tenant  # no tenant host: the key's own tenant
    if tenant is None:
        raise AuthenticationFailed("Invalid API key.", code="invalid_api_key")
    if not tenant.is_active:
        raise TenantSuspended(
            f"The workspace '{tenant.slug}' is suspended; contact your administrator or Parley support."
        )
    retry_after = await auth_failures_retry_after(resolved.extra[0] if resolved.extra else None, identity=identity)
    _user, context = await api_key_verify_async(
        raw_key, tenant=tenant, record=record, client_ip=client_ip, retry_after=retry_after
    )
    assert record is not None  # api_key_verify_async refuses a key without a record
    raws = tuple(raw for raw in resolved.raws if raw is not None)
    if len(raws) == len(resolved.raws):  # (values the database gave are not the cache's yet)
        _remember(
            KnownKey(
                hostname=hostname,
                raws=raws,
                epoch=resolved.epoch,
                tenant=tenant,
                record=record,
                context=context,
            )
        )
    return tenant, resolved.epoch, context


@dataclass(frozen=True, slots=True)
class KnownKey:
    """An API key this process accepted, and what that rested on: the resolution cache's entries
    (their values) and the configuration epoch. The edge verifies a later request's key against
    it without Redis, then confirms in the round trip it makes anyway (the admission's) that none
    of it changed — a revoked key, a suspended tenant, a changed policy all change one of them."""

    hostname: str | None
    raws: tuple[bytes, ...]
    epoch: bytes
    tenant: Tenant
    record: ApiKeyRecord
    context: AuthContext

    @property
    def confirmation_keys(self) -> list[str]:
        """The keys whose values it rests on (``raws``, then ``epoch``)."""
        return [*resolution_cache_keys(self.hostname, self.record.prefix), EPOCH_KEY]


KNOWN_KEYS = 10_000  # per process; the oldest go first
_known_keys: dict[tuple[str | None, str], KnownKey] = {}


def _remember(known: KnownKey) -> None:
    _known_keys.pop((known.hostname, known.record.prefix), None)
    _known_keys[known.hostname, known.record.prefix] = known
    while len(_known_keys) > KNOWN_KEYS:
        del _known_keys[next(iter(_known_keys))]


def api_key_known(raw_key: str, *, host: str) -> KnownKey | None:
    """The key as this process last accepted it with this host, if the secret matches and it has
    not expired since; None otherwise (the caller then authenticates in full, which also words
    any refusal). The caller must confirm it: ``api_key_confirm_queue``, ``api_key_confirmed``."""
    prefix = api_key_parse_prefix(raw_key)
    known = _known_keys.get((tenant_hostname(host), prefix)) if prefix else None
    if known is None or not hmac.compare_digest(known.record.secret_hash, api_key_hash(raw_key)):
        return None
    expires_at = known.record.expires_at
    if expires_at is not None and expires_at <= timezone.now():
        return None
    return known


@dataclass(frozen=True, slots=True)
class QueuedConfirmation:
    first: int  # where the replies start among the pipeline's
    has_peek: bool  # the brute-force limit's state was asked for (the limit may be switched off)


def api_key_confirm_queue(pipe, known: KnownKey, *, client_ip: str, peek: bool = True) -> QueuedConfirmation:
    """Queue on ``pipe`` what ``api_key_confirmed`` needs: the cache entries and the epoch, and the
    brute-force limit's state for this client (not with ``peek=False``: the caller's gate checks
    the client has no recent failure, and asks ``api_key_confirmed`` for it only if it did not
    hold)."""
    from billing.ratelimit import auth_failures_peek_queue

    first = len(pipe)
    pipe.mget(known.confirmation_keys)
    if peek:
        auth_failures_peek_queue(pipe, _throttle_identity(known.record.prefix, client_ip))
    return QueuedConfirmation(first=first, has_peek=len(pipe) > first + 1)


def api_key_unchanged_condition(known: KnownKey, *, client_ip: str) -> tuple[list[str], list[bytes], str]:
    """What ``api_key_confirmed`` checks, for a Redis script to check again later in the same round
    trip (chat.admission.AdmissionGate): the keys whose values must be unchanged, those values, and
    the client's brute-force key, which must not exist (stricter than the limit: any recent
    failure sends the request the full way, where the limit itself is applied)."""
    from billing.ratelimit import auth_failure_key

    return (
        known.confirmation_keys,
        [*known.raws, known.epoch],
        auth_failure_key(_throttle_identity(known.record.prefix, client_ip)),
    )


async def api_key_confirmed(
    known: KnownKey, replies: list, queued: QueuedConfirmation, *, client_ip: str, is_unthrottled: bool = False
) -> bool:
    """Whether the replies show nothing changed since ``known`` was accepted, and this client is
    not throttled for the key. If not, the key is forgotten here (the full check follows).
    ``is_unthrottled``: the caller's gate found no recent failure of this client with this key
    (``api_key_unchanged_condition``); without it or a peek among the replies, the brute-force
    limit is asked now."""
    from billing.ratelimit import auth_failures_exceeded_async, auth_failures_retry_after

    identity = _throttle_identity(known.record.prefix, client_ip)
    values = replies[queued.first]
    is_same = isinstance(values, list) and tuple(values[:-1]) == known.raws and values[-1] == known.epoch
    if is_same and not is_unthrottled:
        if queued.has_peek:
            retry_after = await auth_failures_retry_after(replies[queued.first + 1], identity=identity)
        else:
            retry_after = await auth_failures_exceeded_async(identity=identity)
        is_same = retry_after is None
    if not is_same:
        _known_keys.pop((known.hostname, known.record.prefix), None)
        return False
    await _touch_async(known.record)
    return True


async def _touch_async(record: ApiKeyRecord) -> None:
    if time.monotonic() - _touched_here.get(record.id, -math.inf) >= LAST_USED_RESOLUTION.total_seconds():
        from asgiref.sync import sync_to_async

        await sync_to_async(_touch, thread_sensitive=False)(record, timezone.now())  # once a minute per key


async def api_key_verify_async(
    raw_key: str, *, tenant: Tenant | None, record: ApiKeyRecord | None, client_ip: str, retry_after: float | None
):
    """``api_key_verify`` for the async transports, the brute-force limit's state already read
    (``retry_after``: ``auth_failures_exceeded``'s answer)."""
    from billing.ratelimit import auth_failure_register_async

    try:
        result = _api_key_check(raw_key, tenant=tenant, record=record, retry_after=retry_after)
    except _WrongSecret:
        await auth_failure_register_async(identity=_throttle_identity(api_key_parse_prefix(raw_key), client_ip))
        raise AuthenticationFailed("Invalid API key.", code="invalid_api_key") from None
    await _touch_async(result[0].record)
    return result


def _refuse_if_throttled(retry_after: float | None) -> None:
    if retry_after is not None:
        seconds = max(1, math.ceil(retry_after))
        raise ParleyError(
            f"Too many failed attempts with this API key from your address; retry after {seconds} s.",
            code="too_many_auth_failures",
            status_code=429,
            headers={"Retry-After": str(seconds)},
        )


def _accepted(record: ApiKeyRecord, tenant: Tenant | None):
    """The checks after the secret matched: the key's tenant, revocation, expiry."""
    if tenant is None or tenant.pk != record.tenant.pk:
        raise AuthenticationFailed("This API key does not belong to this tenant.", code="invalid_api_key")
    if record.is_revoked:
        raise AuthenticationFailed("This API key has been revoked.", code="api_key_revoked")
    if record.expires_at is not None and record.expires_at <= timezone.now():
        raise AuthenticationFailed("This API key has expired.", code="api_key_expired")
    context = AuthContext(kind="api_key", tenant=tenant, scopes=frozenset(record.scopes), api_key_id=record.id)
    return ApiKeyUser(record), context


_touched_here: dict[int, float] = {}


def _touch(record: ApiKeyRecord, now) -> None:
    # One write per key per minute at most, and off the request path; a process-local note
    # spares even the Redis round trip for keys this process touched within the minute.
    seconds = LAST_USED_RESOLUTION.total_seconds()
    moment = time.monotonic()
    if moment - _touched_here.get(record.id, -seconds) < seconds:
        return
    _touched_here[record.id] = moment
    if get_redis().set(f"parley:apikey:touched:{record.id}", 1, nx=True, ex=int(LAST_USED_RESOLUTION.total_seconds())):
        from tenants.tasks import api_key_touch_task

        api_key_touch_task.delay(api_key_id=record.id, used_at=now.isoformat())


class TenantJWTAuthentication(JWTAuthentication):
    """simplejwt access tokens that carry the tenant: a token of tenant A is refused on tenant B."""

    def authenticate(self, request: Request):
        raw_token = _bearer_token(request)
        if raw_token is None or raw_token.startswith("prly_") or raw_token.count(".") != 2:
            return None
        try:
            validated = self.get_validated_token(raw_token.encode())
        except (InvalidToken, TokenError) as error:
            raise AuthenticationFailed("Invalid or expired token.", code="invalid_token") from error
        tenant = _tenant_of(request)
        if tenant is None or validated.get("tenant") != tenant.schema_name:
            raise AuthenticationFailed("This token was not issued for this tenant.", code="invalid_token")
        user = self.get_user(validated)
        assert isinstance(user, User)  # simplejwt types it as any user model; ours is User
        scopes = membership_scopes(user, tenant)
        if scopes is None:
            raise AuthenticationFailed("You are not a member of this tenant.", code="invalid_token")
        return user, AuthContext(kind="jwt", tenant=tenant, scopes=scopes)


class TenantOAuth2Authentication(OAuth2Authentication):
    """django-oauth-toolkit tokens; their tables live in the tenant schema, so a token is only
    ever found in the tenant that issued it."""

    def authenticate(self, request: Request):
        raw_token = _bearer_token(request)
        tenant = _tenant_of(request)
        if raw_token is None or tenant is None or raw_token.startswith("prly_") or raw_token.count(".") == 2:
            return None
        result = super().authenticate(request)
        if result is None:
            raise AuthenticationFailed("Invalid or expired OAuth2 token.", code="invalid_token")
        user, token = result
        scopes = frozenset(token.scope.split()) & ALL_SCOPES
        # A token never carries more than the role of the person behind it allows, checked on
        # every request: the token's user, or for client credentials the application's owner
        # (an application without an owner acts for nobody). A demoted or removed member's
        # tokens shrink or stop at once.
        application = token.application
        person = user if user is not None else (application.user if application is not None else None)
        member_scopes = membership_scopes(person, tenant) if person is not None else None
        if member_scopes is None:
            raise AuthenticationFailed("The token's user is not a member of this tenant.", code="invalid_token")
        scopes &= member_scopes
        if user is not None:
            principal = user
        else:
            assert application is not None  # a token without a user came from client credentials
            principal = _ClientPrincipal(application.client_id, owner_id=application.user_id)
        return principal, AuthContext(kind="oauth2", tenant=tenant, scopes=scopes, extra={"token_id": token.pk})


class _ClientPrincipal:
    """A client-credentials caller: an integration, not a person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    pk = None
    id = None

    def __init__(self, client_id: str, *, owner_id: int | None = None) -> None:
        self.client_id = client_id
        self.owner_id = owner_id  # the member whose role bounds its scopes


class TenantSessionAuthentication(SessionAuthentication):
    """The admin site's session (CSRF enforced), valid only for members of the host's tenant."""

    def authenticate(self, request: Request):
        result = super().authenticate(request)
        if result is None:
            return None
        user, _ = result
        tenant = _tenant_of(request)
        if tenant is None:
            return None
        scopes = membership_scopes(user, tenant)
        if scopes is None:
            return None
        return user, AuthContext(kind="session", tenant=tenant, scopes=scopes)
