"""The embeddable widget's domain: which pages may use a bot, who the visitor is, and their feedback.

A bot's public id is printed on every page that embeds it, so it proves nothing. The widget
therefore exchanges it first for a short-lived signed *visitor token* (``visitor_token_issue``),
bound to the tenant, the bot, the page's origin and the visitor id (and, with identity
verification, the customer's user id); every later call carries the token and is checked against
the request's bot and origin (``visitor_token_verify``). Tokens are stateless (Django's signing with
the secret key and a salt of their own), so any web replica verifies them without a lookup.

Identity verification: the customer's backend computes ``HMAC-SHA256(bot.identity_secret, user_id)``
(hex) for its signed-in user; the widget passes ``user_id`` and ``user_hash``, and the visitor's
conversations then belong to the end user ``verified:<user_id>`` (kind ``user``) rather than to
the browser's anonymous ``visitor:<id>``: their history follows them across devices, and a data
request can name them.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.core import signing
from django.utils import timezone

from billing.ratelimit import Limit, RateLimited, rate_limit, rate_limit_headers
from chat import selectors
from chat.models import Bot, Conversation, Message, default_theme
from chat.selectors import EndUser
from tenants.errors import AuthenticationFailed, NotFound, PermissionDeniedError, ValidationFailed

VISITOR_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# The customer's own user ids: printable, no whitespace or control characters, bounded.
USER_ID = re.compile(r"^[\x21-\x7e]{1,100}$")
USER_HASH = re.compile(r"^[0-9a-fA-F]{64}$")
COLOR = re.compile(r"^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$")
POSITIONS = ("left", "right")
TOKEN_SALT = "parley.widget.visitor-token"  # noqa: S105 - a namespace for signatures, not a secret
TOKEN_PREFIX = "pwt."  # noqa: S105 - tells a visitor token from an API key or a JWT at a glance
FEEDBACK_COMMENT_CHARS = 2_000


# --- origins ------------------------------------------------------------------------------------


def origin_normalise(origin: str | None) -> str | None:
    """``https://Shop.Example.com/`` → ``https://shop.example.com``; None for anything that is not
    an http(s) origin (absent, ``null`` from sandboxed frames and files, paths, credentials)."""
    if not origin:
        return None
    try:
        parts = urlsplit(origin.strip())
        port = parts.port  # raises on a malformed port
    except ValueError:
        return None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        return None
    default_port = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


def origin_allowed(bot: Bot, origin: str | None) -> bool:
    """Whether a page of ``origin`` may use the bot: on its ``allowed_origins`` (compared
    normalised), or any origin when the tenant chose ``allow_any_origin``. An empty list refuses
    everyone: a new bot is not usable from the web until its tenant says where."""
    if bot.allow_any_origin:
        return True
    normalised = origin_normalise(origin)
    if normalised is None:
        return False
    return normalised in {origin_normalise(allowed) for allowed in bot.allowed_origins}


def origin_check(*, bot: Bot, origin: str | None) -> str:
    """The request's origin, normalised ("" when absent and the bot allows any origin), or a 403."""
    if not origin_allowed(bot, origin):
        shown = origin if origin else "(none)"
        raise PermissionDeniedError(
            f"This website ({shown[:200]}) is not allowed to use this chat bot. "
            "The bot's owner can add it to the bot's allowed origins.",
            code="origin_not_allowed",
        )
    return origin_normalise(origin) or ""


# --- visitors and verified users ----------------------------------------------------------------


def visitor_id_validate(visitor_id: object) -> str:
    if not isinstance(visitor_id, str) or not VISITOR_ID.match(visitor_id):
        raise ValidationFailed("visitor_id must be 8-64 letters, digits, '-' or '_'.", param="visitor_id")
    return visitor_id


def visitor_end_user(visitor_id: str) -> EndUser:
    return EndUser(kind=Conversation.EndUserKind.VISITOR, id=f"visitor:{visitor_id}")


def verified_end_user(user_id: str) -> EndUser:
    return EndUser(kind=Conversation.EndUserKind.USER, id=f"verified:{user_id}")


def user_hash_compute(*, secret: str, user_id: str) -> str:
    """What the customer's backend computes: hex HMAC-SHA256 of the user id under the bot's secret."""
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def identity_verify(*, bot: Bot, user_id: object, user_hash: object) -> str | None:
    """The verified user id, None when the widget sent none, or an error for a bad claim."""
    if user_id in (None, "") and user_hash in (None, ""):
        return None
    if not isinstance(user_id, str) or not USER_ID.match(user_id):
        raise ValidationFailed("user_id must be 1-100 printable characters without spaces.", param="user_id")
    if not isinstance(user_hash, str) or not USER_HASH.match(user_hash):
        raise ValidationFailed("user_hash must be the 64-character hex HMAC-SHA256 of user_id.", param="user_hash")
    if not bot.identity_secret:
        raise ValidationFailed(
            "Identity verification is not enabled for this bot.", code="identity_verification_disabled", param="user_id"
        )
    expected = user_hash_compute(secret=bot.identity_secret, user_id=user_id)
    if not hmac.compare_digest(expected, user_hash.lower()):
        raise AuthenticationFailed("user_hash does not match user_id.", code="invalid_user_hash")
    return user_id


def bot_identity_secret_rotate(*, bot: Bot) -> str:
    """A new identity secret for the bot (the old one stops verifying at once); returns it.

    Tokens already issued to verified users stay valid until they expire (minutes)."""
    secret = secrets.token_urlsafe(32)
    Bot.objects.filter(pk=bot.pk).update(identity_secret=secret)
    bot.identity_secret = secret
    return secret


# --- visitor tokens -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VisitorToken:
    schema_name: str
    bot_public_id: str
    origin: str
    visitor_id: str
    verified_user_id: str | None = None

    @property
    def end_user(self) -> EndUser:
        if self.verified_user_id is not None:
            return verified_end_user(self.verified_user_id)
        return visitor_end_user(self.visitor_id)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime
    visitor: VisitorToken


def visitor_token_issue(
    *, schema_name: str, bot: Bot, origin: str, visitor_id: str, verified_user_id: str | None = None
) -> IssuedToken:
    """A signed token naming the tenant, bot, origin and visitor (and verified user), valid for
    ``PARLEY_WIDGET_TOKEN_SECONDS``. Checks done by the caller: origin allowed, identity verified."""
    visitor = VisitorToken(
        schema_name=schema_name,
        bot_public_id=bot.public_id,
        origin=origin,
        visitor_id=visitor_id,
        verified_user_id=verified_user_id,
    )
    payload = {"t": schema_name, "b": bot.public_id, "o": origin, "v": visitor_id, "u": verified_user_id}
    token = TOKEN_PREFIX + signing.dumps(payload, salt=TOKEN_SALT, compress=True)
    expires_at = timezone.now() + timedelta(seconds=settings.PARLEY_WIDGET_TOKEN_SECONDS)
    return IssuedToken(token=token, expires_at=expires_at.astimezone(UTC), visitor=visitor)


def visitor_token_verify(token: str, *, schema_name: str, bot: Bot, origin: str) -> VisitorToken:
    """The token's visitor if it was signed here, is unexpired, and names this tenant, bot and
    origin; AuthenticationFailed (401) otherwise — the widget then fetches a new one."""
    if not token.startswith(TOKEN_PREFIX):
        raise AuthenticationFailed("Invalid widget token.", code="invalid_token")
    try:
        payload = signing.loads(
            token.removeprefix(TOKEN_PREFIX), salt=TOKEN_SALT, max_age=settings.PARLEY_WIDGET_TOKEN_SECONDS
        )
    except signing.SignatureExpired:
        raise AuthenticationFailed("The widget token has expired.", code="token_expired") from None
    except signing.BadSignature:
        raise AuthenticationFailed("Invalid widget token.", code="invalid_token") from None
    if not isinstance(payload, dict) or (payload.get("t"), payload.get("b"), payload.get("o")) != (
        schema_name,
        bot.public_id,
        origin,
    ):
        raise AuthenticationFailed("This widget token was issued for another bot or website.", code="invalid_token")
    return VisitorToken(
        schema_name=schema_name,
        bot_public_id=bot.public_id,
        origin=origin,
        visitor_id=payload["v"],
        verified_user_id=payload.get("u"),
    )


# --- limits -------------------------------------------------------------------------------------


def _session_limits_admit(*, schema_name: str, limits: list[Limit], message: str) -> None:
    decision = rate_limit(schema_name=schema_name, limits=limits, costs={"requests": 1})
    if decision.allowed:
        return
    seconds = max(1, math.ceil(decision.retry_after))
    raise RateLimited(
        f"{message} Retry after {seconds} s.", retry_after=decision.retry_after, headers=rate_limit_headers(decision)
    )


def client_address(meta: dict) -> str:
    """The client's address for per-address limits: ``REMOTE_ADDR``, or behind trusted load
    balancers the X-Forwarded-For entry they appended (entries further left are the client's own
    claims, which anyone can forge)."""
    hops = settings.PARLEY_WIDGET_TRUSTED_PROXY_HOPS
    if hops > 0:
        forwarded = [part.strip() for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
        if len(forwarded) >= hops:
            return forwarded[-hops]
    return meta.get("REMOTE_ADDR", "")


def session_admit(*, schema_name: str, visitor_id: str, client_ip: str) -> None:
    """Token exchanges per visitor and per client address (429 with Retry-After): a script
    minting visitor ids is held by its address; one visitor cannot spin tokens either."""
    _session_limits_admit(
        schema_name=schema_name,
        limits=[
            Limit("widget_ip", client_ip or "unknown", "requests", settings.PARLEY_WIDGET_SESSIONS_PER_IP_PER_MINUTE),
            Limit("widget_visitor", visitor_id, "requests", settings.PARLEY_WIDGET_SESSIONS_PER_VISITOR_PER_MINUTE),
        ],
        message="Too many chat sessions started from this browser or address.",
    )


# --- what the widget shows ----------------------------------------------------------------------


def widget_theme(bot: Bot) -> dict:
    """The bot's theme with only values the widget can use safely (colours as hex, a known
    position); anything else falls back to the default."""
    theme = bot.theme if isinstance(bot.theme, dict) else {}
    default = default_theme()
    cleaned = {}
    for name in ("primary_color", "text_color"):
        value = theme.get(name)
        cleaned[name] = value if isinstance(value, str) and COLOR.match(value) else default[name]
    position = theme.get("position")
    cleaned["position"] = position if position in POSITIONS else default["position"]
    return cleaned


def conversation_get_for_visitor(*, bot: Bot, visitor: VisitorToken, conversation_id: str) -> Conversation:
    """The visitor's own conversation with this bot; NotFound for anyone else's."""
    conversation = selectors.conversation_get(conversation_id=conversation_id, end_user=visitor.end_user)
    if conversation.bot_id != bot.pk:
        raise NotFound(f"No conversation with id {conversation_id!r}.", param="id")
    return conversation


# --- feedback -----------------------------------------------------------------------------------


def message_feedback_set(*, conversation: Conversation, message_id: str, verdict: str, comment: str = "") -> Message:
    """The end user's thumbs up/down (``verdict`` "" withdraws it) on an assistant answer of their
    own conversation (the caller fetched ``conversation`` with its access check)."""
    if verdict not in (*Message.Feedback.values, ""):
        raise ValidationFailed("verdict must be 'up', 'down' or ''.", param="verdict")
    if len(comment) > FEEDBACK_COMMENT_CHARS:
        raise ValidationFailed(f"comment is longer than {FEEDBACK_COMMENT_CHARS} characters.", param="comment")
    message = selectors.message_get_stored(conversation=conversation, message_id=message_id)
    if message.role != Message.Role.ASSISTANT:
        raise ValidationFailed("Only answers can be rated.", code="not_an_answer", param="message_id")
    message.feedback = verdict
    message.feedback_comment = comment if verdict else ""
    message.feedback_at = timezone.now() if verdict else None
    Message.objects.filter(pk=message.pk).update(
        feedback=message.feedback, feedback_comment=message.feedback_comment, feedback_at=message.feedback_at
    )
    return message
