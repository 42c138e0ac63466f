"""Monthly token budgets per tenant, per API key and per end user, enforced across replicas.

Reserve before the call, settle after it:

* ``budget_reserve`` runs one Lua script that checks every *hard* level (used + reserved +
  estimate must fit) and, only if all fit, adds the estimate to every level: all or nothing, so
  no interleaving of replicas can over-spend. Soft levels never refuse; crossing a threshold
  (``BILLING_BUDGET_ALERT_THRESHOLDS``, percent) is reported once per level and month, logged and
  stored as a ``BudgetAlert``.
* ``budget_settle`` replaces the estimate with the real usage (adds ``actual - reserved``),
  once per reservation: settling twice changes nothing.
* A reservation never settled (its worker died) is released by ``budget_reservations_expire``
  (a beat task) after ``BILLING_RESERVATION_STALE_SECONDS``; a settle arriving after that adds the
  whole real usage.

Redis layout, all under the tenant's prefix (``t:<schema>:``):

* ``budget:<YYYY-MM>``: a hash of counters, one field per level (``tenant:<schema>``,
  ``key:<id>``, ``end_user:<id>``) holding settled usage plus open reservations, and the
  ``alert:<percent>:<field>`` flags. Kept ~40 days.
* ``budget:<YYYY-MM>:r:<reservation id>``: the reservation (state, tokens, the levels and their
  limits), kept two days after it is settled so that a repeated settle is recognised.
* ``budget:pending``: open reservations by time, for the expiry sweep.

A counter missing from Redis (first use this month, or Redis lost its data) is initialised from
PostgreSQL's usage for the month with HSETNX before anything is reserved: a Redis restart cannot
hand out a fresh budget, and two replicas initialising at once keep the first value.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, cast

import redis
import structlog
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import F, OuterRef, Subquery, Sum

from billing.models import ApiKeyBudget, BudgetAlert, Plan, TenantBilling, UsageDaily, UsageRecord
from tenants.config_epoch import EpochCache
from tenants.errors import ParleyError
from tenants.redis import REDIS_UNAVAILABLE, get_loop_redis, get_redis, lua_source, script_queue, script_sha, tenant_key

logger = structlog.get_logger(__name__)

LEVEL_TENANT = "tenant"
LEVEL_KEY = "key"
LEVEL_END_USER = "end_user"
LEVELS = (LEVEL_TENANT, LEVEL_KEY, LEVEL_END_USER)
_LEVEL_OWNER = {LEVEL_TENANT: "This tenant's", LEVEL_KEY: "This API key's", LEVEL_END_USER: "This end user's"}

DEFAULT_ALERT_THRESHOLDS = (80, 100)
DEFAULT_COUNTER_TTL_SECONDS = 40 * 86_400  # a month and some slack for late settles
DEFAULT_RESERVATION_TTL_SECONDS = 2 * 86_400
DEFAULT_RESERVATION_STALE_SECONDS = 15 * 60  # far beyond any generation's timeouts and retries
INIT_ATTEMPTS = 3  # initialise missing counters, then retry: twice is enough unless Redis is flapping
EXPIRE_BATCH = 1_000  # stale reservations released per tenant per sweep


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    level: str  # "tenant" | "key" | "end_user"
    identity: str  # the schema name, the key id, the end user id
    monthly_tokens: int
    is_hard: bool

    @property
    def counter_field(self) -> str:
        return f"{self.level}:{self.identity}"


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    tenant_schema: str
    month: str  # YYYY-MM: settled into the month it was reserved in
    levels: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe, to hand the reservation from the web edge to the generation worker."""
        return {
            "reservation_id": self.reservation_id,
            "tenant_schema": self.tenant_schema,
            "month": self.month,
            "levels": [list(level) for level in self.levels],
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reservation:
        return cls(
            reservation_id=data["reservation_id"],
            tenant_schema=data["tenant_schema"],
            month=data["month"],
            levels=[(level, identity) for level, identity in data["levels"]],
            tokens=int(data["tokens"]),
        )


class BudgetExceeded(ParleyError):
    status_code = 402
    error_type = "insufficient_quota"  # OpenAI's type for an exhausted quota
    code = "budget_exceeded"

    def __init__(self, message: str, *, level: str, identity: str, monthly_tokens: int, used_tokens: int) -> None:
        super().__init__(message)
        self.level = level
        self.identity = identity
        self.monthly_tokens = monthly_tokens
        self.used_tokens = used_tokens


class BudgetUnavailable(ParleyError):
    status_code = 503
    error_type = "api_error"
    code = "budget_unavailable"


@dataclass(frozen=True, slots=True)
class BudgetAlertEvent:
    level: str
    identity: str
    threshold_percent: int
    used_tokens: int
    monthly_tokens: int
    is_hard: bool


# --- months -------------------------------------------------------------------------------------


def month_of(moment: datetime | date) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"


def current_month() -> str:
    return month_of(datetime.now(tz=UTC))


def month_bounds(month: str) -> tuple[date, date]:
    """First day of the month and first day of the next (UTC)."""
    year, number = (int(part) for part in month.split("-"))
    start = date(year, number, 1)
    return start, (date(year + 1, 1, 1) if number == 12 else date(year, number + 1, 1))


def _aware(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# --- limits -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BillingPolicy:
    """What the gateway enforces for one request: the plan's per-minute limits (with the API key's
    overrides) and the monthly budgets."""

    requests_per_minute: int
    tokens_per_minute: int
    key_requests_per_minute: int | None
    key_tokens_per_minute: int | None
    budgets: list[BudgetLimit]


def billing_policy_get(*, tenant, api_key_id: int | None, end_user: str) -> BillingPolicy:
    """The rate limits and budgets a request of this tenant, key and end user must fit in, in one
    query (tenant ⋈ plan ⋈ billing, the key's overrides as subqueries).

    Read from the database on every call, not from the resolution cache: a plan or budget change
    takes effect on the next request.

    * tenant: ``TenantBilling.monthly_token_budget``, else the plan's included tokens; hard unless
      the tenant's billing allows overage (``is_budget_hard=False``). No plan: the default plan.
    * key: ``ApiKeyBudget.monthly_token_budget`` when set; always hard. Its per-minute overrides
      replace the plan's for that key.
    * end user: ``TenantBilling.end_user_monthly_tokens`` when set and the end user is known; hard.
    """
    from tenants.models import Tenant

    rows = Tenant.objects.filter(pk=tenant.pk).select_related("plan", "billing")
    if api_key_id is not None:
        overrides = ApiKeyBudget.objects.filter(api_key_id=api_key_id, api_key__tenant_id=OuterRef("pk"))
        rows = rows.annotate(
            key_budget=Subquery(overrides.values("monthly_token_budget")[:1]),
            key_rpm=Subquery(overrides.values("requests_per_minute")[:1]),
            key_tpm=Subquery(overrides.values("tokens_per_minute")[:1]),
        )
    row = rows.first()
    plan = (row.plan if row is not None else None) or Plan()
    if row is None:
        return BillingPolicy(plan.requests_per_minute, plan.tokens_per_minute, None, None, [])
    try:
        billing = row.billing
    except TenantBilling.DoesNotExist:  # a reverse one-to-one raises rather than returning None
        billing = None
    tenant_tokens = plan.included_tokens_per_month
    is_hard = True
    end_user_tokens = None
    if billing is not None:
        if billing.monthly_token_budget is not None:
            tenant_tokens = billing.monthly_token_budget
        is_hard = billing.is_budget_hard
        end_user_tokens = billing.end_user_monthly_tokens
    limits = [BudgetLimit(LEVEL_TENANT, row.schema_name, tenant_tokens, is_hard)]
    key_tokens = getattr(row, "key_budget", None)
    if api_key_id is not None and key_tokens is not None:
        limits.append(BudgetLimit(LEVEL_KEY, str(api_key_id), key_tokens, True))
    if end_user and end_user_tokens is not None:
        limits.append(BudgetLimit(LEVEL_END_USER, end_user, end_user_tokens, True))
    return BillingPolicy(
        requests_per_minute=plan.requests_per_minute,
        tokens_per_minute=plan.tokens_per_minute,
        key_requests_per_minute=getattr(row, "key_rpm", None),
        key_tokens_per_minute=getattr(row, "key_tpm", None),
        budgets=limits,
    )


_policies = EpochCache()


async def billing_policy_cached(*, tenant, api_key_id: int | None, end_user: str, epoch: bytes) -> BillingPolicy:
    """``billing_policy_get`` for the hot path: read once per configuration epoch and process
    (tenants.config_epoch), so a plan or budget change still applies from the next request.

    One entry serves every end user of a key: the end user's budget, when the tenant sets one,
    is the same for all of them but for whom it counts."""
    key = (tenant.pk, api_key_id, bool(end_user))
    policy = _policies.get(epoch, key)
    if policy is None:
        policy = await sync_to_async(billing_policy_get, thread_sensitive=True)(
            tenant=tenant, api_key_id=api_key_id, end_user=_ANY_END_USER if end_user else ""
        )
        _policies.put(epoch, key, policy)
    if not end_user:
        return policy
    budgets = [
        replace(limit, identity=end_user) if limit.level == LEVEL_END_USER else limit for limit in policy.budgets
    ]
    return replace(policy, budgets=budgets)


_ANY_END_USER = "\x00end-user"  # stands for the request's end user in a cached policy


def budget_limits_for(*, tenant, api_key_id: int | None, end_user: str) -> list[BudgetLimit]:
    """The budgets alone (see billing_policy_get)."""
    return billing_policy_get(tenant=tenant, api_key_id=api_key_id, end_user=end_user).budgets


# --- Redis keys and scripts ---------------------------------------------------------------------


def budget_counters_key(tenant_schema: str, month: str) -> str:
    return tenant_key(tenant_schema, "budget", month)


def _reservation_key(tenant_schema: str, month: str, reservation_id: str) -> str:
    return tenant_key(tenant_schema, "budget", month, "r", reservation_id)


def _pending_key(tenant_schema: str) -> str:
    return tenant_key(tenant_schema, "budget", "pending")


def _pending_member(month: str, reservation_id: str) -> str:
    return f"{month}|{reservation_id}"


@dataclass(frozen=True)
class _Script:
    source: str

    @property
    def sha(self) -> str:
        return script_sha(self.source)


_ALERTS_LUA = lua_source("billing/lua/budget_alerts.lua")

# KEYS: counters, reservation, pending.
# ARGV: tokens, pending member, now, counters ttl, reservation ttl, thresholds, n,
#       then n times (field, limit, hard "1"/"0").
# Returns {-1, missing fields…} | {0, field, used, limit} | {1, alerts…} | {2} (already reserved).
_RESERVE = _Script(_ALERTS_LUA + lua_source("billing/lua/budget_reserve.lua"))

# KEYS: counters, reservation, pending.
# ARGV: actual tokens, pending member, reservation ttl, thresholds, n, then n fields (used only
#       when Redis no longer knows the reservation).
# Counters are only ever changed, never created, here: a missing one is initialised from
# PostgreSQL on the next reserve, which must not find a partial value.
# Returns {0} (already settled) | {1, alerts…}.
_SETTLE = _Script(_ALERTS_LUA + lua_source("billing/lua/budget_settle.lua"))

# KEYS: counters, reservation, pending. ARGV: pending member, reservation ttl.
# Returns 1 if the reservation was open and its tokens were given back, else 0.
_RELEASE = _Script(lua_source("billing/lua/budget_release.lua"))


def _eval(client: redis.Redis, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    try:
        return client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(script.source, len(keys), *keys, *args)


async def _eval_async(client, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        return await client.eval(script.source, len(keys), *keys, *args)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _thresholds() -> str:
    return ",".join(str(int(p)) for p in getattr(settings, "BILLING_BUDGET_ALERT_THRESHOLDS", DEFAULT_ALERT_THRESHOLDS))


def _counter_ttl() -> int:
    return getattr(settings, "BILLING_BUDGET_COUNTER_TTL_SECONDS", DEFAULT_COUNTER_TTL_SECONDS)


def _reservation_ttl() -> int:
    return getattr(settings, "BILLING_RESERVATION_TTL_SECONDS", DEFAULT_RESERVATION_TTL_SECONDS)


# --- reserve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetReserveCall:
    reservation: Reservation
    limits: tuple[BudgetLimit, ...]
    keys: tuple[str, str, str]
    args: tuple[Any, ...]

    @classmethod
    def build(
        cls, *, tenant_schema: str, limits: Sequence[BudgetLimit], tokens: int, reservation_id: str
    ) -> BudgetReserveCall:
        if tokens < 0:
            raise ValueError("a reservation cannot be negative")
        if not reservation_id or len(reservation_id) > 200:
            raise ValueError("reservation_id must be 1-200 characters")
        month = current_month()
        fields = [limit.counter_field for limit in limits]
        if len(set(fields)) != len(fields):
            raise ValueError("each budget level may appear once")
        args: list[Any] = [
            tokens,
            _pending_member(month, reservation_id),
            int(time.time()),
            _counter_ttl(),
            _reservation_ttl(),
            _thresholds(),
            len(limits),
        ]
        for limit in limits:
            args += [limit.counter_field, max(0, int(limit.monthly_tokens)), "1" if limit.is_hard else "0"]
        return cls(
            reservation=Reservation(
                reservation_id=reservation_id,
                tenant_schema=tenant_schema,
                month=month,
                levels=[(limit.level, limit.identity) for limit in limits],
                tokens=tokens,
            ),
            limits=tuple(limits),
            keys=(
                budget_counters_key(tenant_schema, month),
                _reservation_key(tenant_schema, month, reservation_id),
                _pending_key(tenant_schema),
            ),
            args=tuple(args),
        )

    def missing_fields(self, result: list) -> list[str] | None:
        return [_text(value) for value in result[1:]] if int(result[0]) == -1 else None

    def outcome(self, result: list) -> tuple[Reservation, list[BudgetAlertEvent]]:
        """The reservation, or BudgetExceeded naming the first hard level that did not fit."""
        status = int(result[0])
        if status == 0:
            raise self._exceeded(_text(result[1]), used=int(result[2]), monthly_tokens=int(result[3]))
        alerts = _alerts_from(result[1:]) if status == 1 else []
        return self.reservation, alerts

    def _exceeded(self, counter_field: str, *, used: int, monthly_tokens: int) -> BudgetExceeded:
        level, identity = counter_field.split(":", 1)
        renews = month_bounds(self.reservation.month)[1].isoformat()
        left = monthly_tokens - used
        owner = _LEVEL_OWNER.get(level, "This")
        if left <= 0:
            message = f"{owner} monthly token budget ({monthly_tokens:,}) is used up; it renews on {renews}."
        else:
            message = (
                f"{owner} monthly token budget ({monthly_tokens:,}) has {left:,} tokens left, fewer than this "
                f"request may use ({self.reservation.tokens:,}); it renews on {renews}."
            )
        return BudgetExceeded(message, level=level, identity=identity, monthly_tokens=monthly_tokens, used_tokens=used)


def _alerts_from(values: Sequence) -> list[BudgetAlertEvent]:
    alerts = []
    for start in range(0, len(values) - 4, 5):
        counter_field, percent, used, limit, hard = values[start : start + 5]
        level, identity = _text(counter_field).split(":", 1)
        alerts.append(
            BudgetAlertEvent(
                level=level,
                identity=identity,
                threshold_percent=int(percent),
                used_tokens=int(used),
                monthly_tokens=int(limit),
                is_hard=_text(hard) == "1",
            )
        )
    return alerts


def budget_reserve(*, tenant_schema: str, limits: list[BudgetLimit], tokens: int, reservation_id: str) -> Reservation:
    """Reserve ``tokens`` at every level, all or nothing; raises BudgetExceeded (402) when a hard
    level cannot fit them, BudgetUnavailable (503) when Redis cannot be reached.

    Repeating a reservation id returns the same reservation without reserving twice.
    """
    call = BudgetReserveCall.build(
        tenant_schema=tenant_schema, limits=limits, tokens=tokens, reservation_id=reservation_id
    )
    if not limits:
        return call.reservation
    client = get_redis()
    try:
        for _attempt in range(INIT_ATTEMPTS):
            result = _eval(client, _RESERVE, call.keys, call.args)
            missing = call.missing_fields(result)
            if missing is None:
                break
            totals = budget_month_totals(tenant_schema=tenant_schema, month=call.reservation.month, fields=missing)
            _counters_init(client, call.keys[0], totals)
        else:
            raise BudgetUnavailable("Budget counters could not be initialised; try again.")
    except REDIS_UNAVAILABLE as error:
        raise BudgetUnavailable("Budgets cannot be checked right now; try again shortly.") from error
    reservation, alerts = call.outcome(result)
    if alerts:
        budget_alerts_record(tenant_schema=tenant_schema, month=reservation.month, alerts=alerts)
    return reservation


async def budget_reserve_async(
    *, tenant_schema: str, limits: list[BudgetLimit], tokens: int, reservation_id: str
) -> Reservation:
    """``budget_reserve`` for async code: Redis through the loop's client, the database (rare:
    initialising counters, recording alerts) in the thread-sensitive executor."""
    call = BudgetReserveCall.build(
        tenant_schema=tenant_schema, limits=limits, tokens=tokens, reservation_id=reservation_id
    )
    if not limits:
        return call.reservation
    client = get_loop_redis()
    try:
        for _attempt in range(INIT_ATTEMPTS):
            result = await _eval_async(client, _RESERVE, call.keys, call.args)
            missing = call.missing_fields(result)
            if missing is None:
                break
            totals = await sync_to_async(budget_month_totals, thread_sensitive=True)(
                tenant_schema=tenant_schema, month=call.reservation.month, fields=missing
            )
            async with client.pipeline(transaction=True) as pipe:
                for counter_field, total in totals.items():
                    pipe.hsetnx(call.keys[0], counter_field, str(total))
                pipe.expire(call.keys[0], _counter_ttl())
                await pipe.execute()
        else:
            raise BudgetUnavailable("Budget counters could not be initialised; try again.")
    except REDIS_UNAVAILABLE as error:
        raise BudgetUnavailable("Budgets cannot be checked right now; try again shortly.") from error
    reservation, alerts = call.outcome(result)
    if alerts:
        await sync_to_async(budget_alerts_record, thread_sensitive=True)(
            tenant_schema=tenant_schema, month=reservation.month, alerts=alerts
        )
    return reservation


def budget_reserve_queue(
    pipe, *, tenant_schema: str, limits: list[BudgetLimit], tokens: int, reservation_id: str
) -> BudgetReserveCall:
    """``budget_reserve_async``'s script queued on ``pipe`` (the gateway checks the rate limits in
    the same round trip); give the call and its reply to :func:`budget_reserve_finish_async`.
    Nothing is queued when there is no budget to check."""
    call = BudgetReserveCall.build(
        tenant_schema=tenant_schema, limits=limits, tokens=tokens, reservation_id=reservation_id
    )
    if limits:
        pipe.evalsha(_RESERVE.sha, len(call.keys), *call.keys, *call.args)
    return call


async def budget_reserve_finish_async(call: BudgetReserveCall, result: Any) -> Reservation:
    """The queued reservation: as ``budget_reserve_async`` — the reservation, BudgetExceeded (402)
    or BudgetUnavailable (503). A reply that needs more (the script not loaded after a Redis
    restart, the month's counters not initialised yet) continues on ``budget_reserve_async``'s
    path with the same reservation id, which reserves once at most."""
    if not call.limits:
        return call.reservation
    if isinstance(result, redis.exceptions.NoScriptError) or (
        not isinstance(result, Exception) and call.missing_fields(result) is not None
    ):
        return await budget_reserve_async(
            tenant_schema=call.reservation.tenant_schema,
            limits=list(call.limits),
            tokens=call.reservation.tokens,
            reservation_id=call.reservation.reservation_id,
        )
    if isinstance(result, REDIS_UNAVAILABLE):
        raise BudgetUnavailable("Budgets cannot be checked right now; try again shortly.") from result
    if isinstance(result, Exception):
        raise result
    reservation, alerts = call.outcome(result)
    if alerts:
        await sync_to_async(budget_alerts_record, thread_sensitive=True)(
            tenant_schema=reservation.tenant_schema, month=reservation.month, alerts=alerts
        )
    return reservation


async def budget_reserve_undo_async(call: BudgetReserveCall, result: Any) -> None:
    """Give back a queued reservation that succeeded, for a request refused after all (by a rate
    limit checked in the same round trip)."""
    if call.limits and isinstance(result, list) and int(result[0]) == 1:
        await budget_settle_async(reservation=call.reservation, actual_tokens=0)


def _counters_init(client: redis.Redis, counters_key: str, totals: dict[str, int]) -> None:
    with client.pipeline(transaction=True) as pipe:
        for counter_field, total in totals.items():
            pipe.hsetnx(counters_key, counter_field, str(total))
        pipe.expire(counters_key, _counter_ttl())
        pipe.execute()


def budget_month_totals(*, tenant_schema: str, month: str, fields: Iterable[str]) -> dict[str, int]:
    """Billable tokens already recorded in PostgreSQL this month, per counter field."""
    from tenants.models import Tenant

    start, end = month_bounds(month)
    tenant_id = Tenant.objects.filter(schema_name=tenant_schema).values_list("id", flat=True).first()
    if tenant_id is None:  # no such tenant (any more): nothing recorded
        return dict.fromkeys(fields, 0)
    daily = UsageDaily.objects.filter(tenant_id=tenant_id, day__gte=start, day__lt=end)
    billable = Sum(F("tokens_in") + F("tokens_out") - F("cached_tokens"))
    totals: dict[str, int] = {}
    for counter_field in fields:
        level, identity = counter_field.split(":", 1)
        total = None
        if level == LEVEL_TENANT:
            total = daily.aggregate(total=billable)["total"]
        elif level == LEVEL_KEY:
            total = daily.filter(api_key_id=int(identity)).aggregate(total=billable)["total"]
        elif level == LEVEL_END_USER:
            total = UsageRecord.objects.filter(
                tenant_id=tenant_id,
                end_user=identity,
                cached=False,
                occurred_at__gte=_aware(start),
                occurred_at__lt=_aware(end),
            ).aggregate(total=Sum(F("tokens_in") + F("tokens_out")))["total"]
        totals[counter_field] = int(total or 0)
    return totals


# --- settle -------------------------------------------------------------------------------------


def _settle_call(reservation: Reservation, actual_tokens: int) -> tuple[tuple[str, str, str], list[Any]]:
    if actual_tokens < 0:
        raise ValueError("actual_tokens must not be negative")
    schema, month = reservation.tenant_schema, reservation.month
    fields = [f"{level}:{identity}" for level, identity in reservation.levels]
    keys = (
        budget_counters_key(schema, month),
        _reservation_key(schema, month, reservation.reservation_id),
        _pending_key(schema),
    )
    args: list[Any] = [
        actual_tokens,
        _pending_member(month, reservation.reservation_id),
        _reservation_ttl(),
        _thresholds(),
        len(fields),
        *fields,
    ]
    return keys, args


def budget_settle(*, reservation: Reservation, actual_tokens: int) -> None:
    """Replace the reservation's estimate by the real billable tokens (0 for a cache hit).

    Idempotent per reservation id. Raises Redis errors: the caller may retry (safely).
    """
    if not reservation.levels:
        return
    keys, args = _settle_call(reservation, actual_tokens)
    result = _eval(get_redis(), _SETTLE, keys, args)
    alerts = _alerts_from(result[1:]) if int(result[0]) == 1 else []
    if alerts:
        budget_alerts_record(tenant_schema=reservation.tenant_schema, month=reservation.month, alerts=alerts)


async def budget_settle_async(*, reservation: Reservation, actual_tokens: int) -> None:
    if not reservation.levels:
        return
    keys, args = _settle_call(reservation, actual_tokens)
    result = await _eval_async(get_loop_redis(), _SETTLE, keys, args)
    alerts = _alerts_from(result[1:]) if int(result[0]) == 1 else []
    if alerts:
        await sync_to_async(budget_alerts_record, thread_sensitive=True)(
            tenant_schema=reservation.tenant_schema, month=reservation.month, alerts=alerts
        )


def budget_settle_queue(pipe, *, reservation: Reservation, actual_tokens: int) -> bool:
    """``budget_settle`` queued on ``pipe`` (an asyncio pipeline without a transaction, run by
    ``tenants.redis.execute_with_scripts``), in one round trip with a turn's other end-of-turn
    writes. True when a command was queued: its reply then goes to :func:`budget_settle_finish`."""
    if not reservation.levels:
        return False
    keys, args = _settle_call(reservation, actual_tokens)
    script_queue(pipe, _SETTLE.source, len(keys), *keys, *args)
    return True


async def budget_settle_finish(*, reservation: Reservation, result: Any) -> None:
    """Record the alerts a queued settlement crossed (its reply from the pipeline)."""
    if isinstance(result, Exception):
        raise result
    alerts = _alerts_from(result[1:]) if int(result[0]) == 1 else []
    if alerts:
        await sync_to_async(budget_alerts_record, thread_sensitive=True)(
            tenant_schema=reservation.tenant_schema, month=reservation.month, alerts=alerts
        )


# --- reading, alerts, expiry ------------------------------------------------------------------


def budget_used(*, tenant_schema: str, level: str, identity: str, month: str | None = None) -> int | None:
    """The counter (settled usage + open reservations) of one level; None if not initialised."""
    value = cast(
        bytes | None,
        get_redis().hget(budget_counters_key(tenant_schema, month or current_month()), f"{level}:{identity}"),
    )
    return None if value is None else int(value)


def budget_alerts_record(*, tenant_schema: str, month: str, alerts: Sequence[BudgetAlertEvent]) -> int:
    """Log and store threshold crossings; a crossing already stored (after a Redis loss) is not
    stored or logged again. Returns how many were new."""
    from tenants.models import Tenant

    tenant_id = Tenant.objects.filter(schema_name=tenant_schema).values_list("id", flat=True).first()
    if tenant_id is None:
        return 0
    created = 0
    for alert in alerts:
        _row, is_new = BudgetAlert.objects.get_or_create(
            tenant_id=tenant_id,
            month=month,
            level=alert.level,
            identity=alert.identity,
            threshold_percent=alert.threshold_percent,
            defaults={
                "monthly_tokens": alert.monthly_tokens,
                "used_tokens": alert.used_tokens,
                "is_hard": alert.is_hard,
            },
        )
        if is_new:
            created += 1
            logger.warning(
                "budget_threshold_crossed",
                tenant=tenant_schema,
                month=month,
                level=alert.level,
                identity=alert.identity,
                threshold_percent=alert.threshold_percent,
                used_tokens=alert.used_tokens,
                monthly_tokens=alert.monthly_tokens,
                is_hard=alert.is_hard,
            )
    return created


def budget_reservations_expire(*, tenant_schemas: Iterable[str], older_than_seconds: float | None = None) -> int:
    """Give back the tokens of reservations open longer than ``older_than_seconds`` (their
    worker died before settling). Returns how many were released."""
    if older_than_seconds is None:
        older_than_seconds = getattr(settings, "BILLING_RESERVATION_STALE_SECONDS", DEFAULT_RESERVATION_STALE_SECONDS)
    client = get_redis()
    cutoff = time.time() - older_than_seconds
    schemas = list(tenant_schemas)
    with client.pipeline(transaction=False) as pipe:
        for schema in schemas:
            pipe.zrangebyscore(_pending_key(schema), "-inf", cutoff, start=0, num=EXPIRE_BATCH)
        stale_by_schema = pipe.execute()
    released = 0
    for schema, members in zip(schemas, stale_by_schema, strict=True):
        for raw_member in members:
            member = _text(raw_member)
            month, _, reservation_id = member.partition("|")
            keys = (
                budget_counters_key(schema, month),
                _reservation_key(schema, month, reservation_id),
                _pending_key(schema),
            )
            released += int(_eval(client, _RELEASE, keys, [member, _reservation_ttl()]))
    if released:
        logger.warning("budget_reservations_expired", count=released)
    return released
