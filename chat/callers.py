"""Who starts a turn: one ``TurnCaller`` per request, resolved by the transport at its edge, with
the one rule for end-user identity.

- An API key is its own end user (``key:<id>``), or names one of its own (OpenAI's ``user``):
  ``key:<id>:<user>``; an OAuth2 client likewise (``oauth:<client id>[:<user>]``).
- A member signed in (JWT, session) is ``user:<pk>``.
- A widget visitor is ``visitor:<id>``, or ``verified:<user id>`` with identity verification
  (chat.widget); visitors also count against the per-address message limit.
- Admin-scope credentials see every end user's conversations and generations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from chat.selectors import EndUser
from chat.widget import VisitorToken
from tenants.authentication import AuthContext, KnownKey, api_key_authenticate_async, api_key_known


@dataclass(frozen=True, slots=True)
class ApiKeyCredential:
    """An API key as presented, kept so that the core can authenticate it in full when the fast
    path's confirmation does not hold (chat.turn_core)."""

    raw_key: str
    host: str
    known: KnownKey | None = None  # accepted by this process before: confirmed in the admission's round trip


@dataclass(frozen=True, slots=True)
class TurnCaller:
    tenant: Any  # tenants.models.Tenant
    scopes: frozenset[str]
    end_user: EndUser
    api_key_id: int | None = None
    client_ip: str = ""
    is_visitor: bool = False
    epoch: bytes | None = None  # the configuration epoch it was resolved under; None: read it
    credential: ApiKeyCredential | None = None
    external_user: str | None = None  # the caller's own end-user id (OpenAI's ``user``)

    @property
    def is_end_user_limited(self) -> bool:
        """An API key acting as itself has the key's limits only, not an end user's as well."""
        return not (self.api_key_id is not None and self.end_user.id == f"key:{self.api_key_id}")


def _sees_all(scopes: frozenset[str]) -> bool:
    return "admin" in scopes


def end_user_of_api_key(api_key_id: int, external_user: str | None, *, scopes: frozenset[str]) -> EndUser:
    identity = f"key:{api_key_id}" + (f":{external_user}" if external_user else "")
    return EndUser(kind="api", id=identity, sees_all=_sees_all(scopes))


def end_user_of_context(context: AuthContext, user: Any, external_user: str | None = None) -> EndUser:
    """The end user behind an authenticated request (DRF's ``request.auth`` and ``request.user``)."""
    if context.kind == "api_key" and context.api_key_id is not None:
        return end_user_of_api_key(context.api_key_id, external_user, scopes=context.scopes)
    if context.kind == "widget":
        return context.extra["visitor"].end_user
    if getattr(user, "pk", None) is not None:
        return EndUser(kind="user", id=f"user:{user.pk}", sees_all=_sees_all(context.scopes))
    client_id = getattr(user, "client_id", "client")
    identity = f"oauth:{client_id}" + (f":{external_user}" if external_user else "")
    return EndUser(kind="api", id=identity, sees_all=_sees_all(context.scopes))


def caller_with_external_user(caller: TurnCaller, external_user: str | None) -> TurnCaller:
    """The caller acting for one of its own end users (OpenAI's ``user``): an API key or an OAuth2
    client names them; a signed-in member or a widget visitor is their own end user regardless."""
    if not external_user or caller.external_user == external_user or caller.is_visitor:
        return caller
    if caller.api_key_id is not None:
        end_user = end_user_of_api_key(caller.api_key_id, external_user, scopes=caller.scopes)
    elif caller.end_user.id.startswith("oauth:") and caller.external_user is None:
        end_user = EndUser(kind="api", id=f"{caller.end_user.id}:{external_user}", sees_all=caller.end_user.sees_all)
    else:
        return caller
    return replace(caller, end_user=end_user, external_user=external_user)


def caller_of_request(request: Any, *, client_ip: str = "", external_user: str | None = None) -> TurnCaller:
    """A DRF request's caller (API key, JWT, OAuth2, session or widget visitor token)."""
    context: AuthContext = request.auth
    visitor = context.extra.get("visitor") if context.kind == "widget" else None
    return TurnCaller(
        tenant=request.tenant,
        scopes=context.scopes,
        end_user=end_user_of_context(context, request.user, external_user),
        api_key_id=context.api_key_id,
        client_ip=client_ip or request.META.get("REMOTE_ADDR", ""),
        is_visitor=visitor is not None,
        external_user=external_user,
    )


def caller_of_visitor(*, tenant: Any, visitor: VisitorToken, client_ip: str, epoch: bytes | None = None) -> TurnCaller:
    return TurnCaller(
        tenant=tenant,
        scopes=frozenset({"chat"}),
        end_user=visitor.end_user,
        client_ip=client_ip,
        is_visitor=True,
        epoch=epoch,
    )


def caller_of_api_key_context(
    *,
    tenant: Any,
    epoch: bytes | None,
    context: AuthContext,
    client_ip: str,
    external_user: str | None = None,
    credential: ApiKeyCredential | None = None,
) -> TurnCaller:
    assert context.api_key_id is not None
    return TurnCaller(
        tenant=tenant,
        scopes=context.scopes,
        end_user=end_user_of_api_key(context.api_key_id, external_user, scopes=context.scopes),
        api_key_id=context.api_key_id,
        client_ip=client_ip,
        epoch=epoch,
        credential=credential,
        external_user=external_user,
    )


async def api_key_caller(
    raw_key: str, *, host: str, client_ip: str, redis, external_user: str | None = None, allow_known: bool = True
) -> TurnCaller:
    """The caller behind an API key presented to an async transport (the edge, WebSocket).

    A key this process accepted before is taken as known here, without a round trip: the core
    confirms it in its admission's round trip, and authenticates it in full (this function with
    ``allow_known=False``) if anything changed. Otherwise: one round trip to the resolution cache
    (tenants.authentication.api_key_authenticate_async), which words every refusal."""
    known = api_key_known(raw_key, host=host) if allow_known else None
    if known is not None:
        return caller_of_api_key_context(
            tenant=known.tenant,
            epoch=known.epoch,
            context=known.context,
            client_ip=client_ip,
            external_user=external_user,
            credential=ApiKeyCredential(raw_key=raw_key, host=host, known=known),
        )
    tenant, epoch, context = await api_key_authenticate_async(raw_key, host=host, client_ip=client_ip, redis=redis)
    return caller_of_api_key_context(
        tenant=tenant,
        epoch=epoch,
        context=context,
        client_ip=client_ip,
        external_user=external_user,
        credential=ApiKeyCredential(raw_key=raw_key, host=host),
    )
