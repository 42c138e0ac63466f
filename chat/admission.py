"""Admission, which every turn passes: rate limits and a budget reservation before it reaches a
model; settlement, the tokens-per-minute charge and metering after it.

Admission runs in the one door into a turn (chat.turn_core), in this order:

1. rate limits (billing.ratelimit): requests and estimated tokens per minute, per API key, tenant,
   bot and end user, all-or-nothing in one Redis script → 429 with ``Retry-After``;
2. the budget reservation (billing.budgets): the estimated tokens reserved atomically at every
   level (tenant → key → end user) → 402 when a hard budget is used up.

The admission's ticket travels with the turn's job; the generation worker settles it with the real
usage (zero for a cached answer), charges the real tokens to the per-minute limits, and records a
usage event (billing.metering, written to PostgreSQL in batches).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings

from billing.budgets import (
    BillingPolicy,
    BudgetExceeded,
    BudgetReserveCall,
    Reservation,
    billing_policy_cached,
    budget_reserve_async,
    budget_reserve_finish_async,
    budget_reserve_queue,
    budget_reserve_undo_async,
    budget_settle_finish,
    budget_settle_queue,
)
from billing.metering import UsageEvent, usage_record_async, usage_record_queue
from billing.ratelimit import (
    Limit,
    RateLimitCall,
    RateLimited,
    rate_limit_async,
    rate_limit_finish_async,
    rate_limit_headers,
    rate_limit_queue,
    rate_limit_refund_async,
    tokens_charge_async,
    tokens_charge_queue,
)
from tenants.errors import ValidationFailed
from tenants.redis import REDIS_UNAVAILABLE, execute_with_scripts, get_loop_redis, lua_source, tenant_key

if TYPE_CHECKING:
    from tenants.models import Tenant

CHARS_PER_TOKEN = 4  # the estimate before a call; the provider's usage settles it after
RATE_LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "end_user_requests_per_minute",
    "end_user_tokens_per_minute",
)


def validate_rate_limits(value) -> dict:
    """A bot's own limits: ``{"requests_per_minute": 600, "end_user_requests_per_minute": 20, …}``
    (absent or 0: no bot limit; end users default to the platform setting)."""
    if not isinstance(value, dict):
        raise ValidationFailed("rate_limits must be an object.", param="rate_limits")
    cleaned = {}
    for name, number in value.items():
        if name not in RATE_LIMIT_FIELDS:
            raise ValidationFailed(f"Unknown rate limit {name!r}.", param=f"rate_limits.{name}")
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 10_000_000:
            raise ValidationFailed(
                f"rate_limits.{name} must be a whole number from 0 to 10,000,000.", param=f"rate_limits.{name}"
            )
        cleaned[name] = number
    return cleaned


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks, resolved at the edge."""

    tenant: Tenant
    bot_id: int
    bot_public_id: str
    bot_rate_limits: dict
    api_key_id: int | None
    end_user: str  # metering and limit identity: "key:12:alice", "visitor:abc", "user:5"
    # False when the end user is the API key itself (no ``user`` given): the key's limits apply.
    is_end_user_limited: bool = True
    # A widget visitor's client address: many visitor ids from one address share one allowance.
    visitor_address: str | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    headers: dict[str, str]
    ticket: dict  # JSON-safe, carried by the turn's job


def estimate_tokens(*, prompt_chars: int, max_tokens: int | None) -> int:
    completion = max_tokens if max_tokens is not None else settings.PARLEY_DEFAULT_MAX_TOKENS_ESTIMATE
    return math.ceil(prompt_chars / CHARS_PER_TOKEN) + completion


def _rate_limits(caller: Caller, policy: BillingPolicy) -> list[Limit]:
    tenant = caller.tenant
    key_rpm, key_tpm = policy.key_requests_per_minute, policy.key_tokens_per_minute
    bot = caller.bot_rate_limits or {}
    end_user_rpm = bot.get("end_user_requests_per_minute", settings.PARLEY_END_USER_REQUESTS_PER_MINUTE)
    end_user_tpm = bot.get("end_user_tokens_per_minute", settings.PARLEY_END_USER_TOKENS_PER_MINUTE)
    limits = [
        Limit("tenant", tenant.schema_name, "requests", policy.requests_per_minute),
        Limit("tenant", tenant.schema_name, "tokens", policy.tokens_per_minute),
        Limit("bot", caller.bot_public_id, "requests", bot.get("requests_per_minute", 0)),
        Limit("bot", caller.bot_public_id, "tokens", bot.get("tokens_per_minute", 0)),
    ]
    if caller.is_end_user_limited:
        limits += [
            Limit("end_user", caller.end_user, "requests", end_user_rpm),
            Limit("end_user", caller.end_user, "tokens", end_user_tpm),
        ]
    if caller.visitor_address is not None:
        limits.append(
            Limit(
                "widget_ip_messages",
                caller.visitor_address,
                "requests",
                settings.PARLEY_WIDGET_MESSAGES_PER_IP_PER_MINUTE,
            )
        )
    if caller.api_key_id is not None:
        limits += [
            Limit("key", str(caller.api_key_id), "requests", key_rpm or policy.requests_per_minute),
            Limit("key", str(caller.api_key_id), "tokens", key_tpm or policy.tokens_per_minute),
        ]
    return limits


def _limit_dict(limit: Limit) -> dict:
    return {"scope": limit.scope, "identity": limit.identity, "kind": limit.kind, "per_minute": limit.per_minute}


async def admission_prepare(
    *, caller: Caller, prompt_chars: int, max_tokens: int | None, epoch: bytes
) -> QueuedAdmission:
    """A turn's admission, to send in a round trip the caller makes (chat.turn_core, which reads
    the exact cache entry or confirms an API key in the same one): queue, then finish — or undo.
    The billing policy comes from memory, read once per configuration epoch (no SQL)."""
    estimate = estimate_tokens(prompt_chars=prompt_chars, max_tokens=max_tokens)
    policy = await billing_policy_cached(
        tenant=caller.tenant, api_key_id=caller.api_key_id, end_user=caller.end_user, epoch=epoch
    )
    limits = _rate_limits(caller, policy)
    return QueuedAdmission(
        caller=caller,
        estimate=estimate,
        limits=limits,
        budgets=policy.budgets,
        token_limits=[limit for limit in limits if limit.kind == "tokens" and limit.per_minute > 0],
        reservation_id=uuid.uuid4().hex,
    )


@dataclass(slots=True)
class QueuedAdmission:
    """The rate limits and the budget reservation in one round trip (on the time to first token's
    path). A request the rate limits refuse gives its reservation back; one the budget refuses,
    its per-minute tokens."""

    caller: Caller
    estimate: int
    limits: list[Limit]
    budgets: list
    token_limits: list[Limit]
    reservation_id: str
    first: int = 0  # where the admission's replies start among the pipeline's
    rate_call: RateLimitCall | None = None  # set by ``queue``
    reserve_call: BudgetReserveCall | None = None  # set by ``queue``

    @property
    def costs(self) -> dict[str, int]:
        return {"requests": 1, "tokens": self.estimate}

    @property
    def queued_rate_call(self) -> RateLimitCall:
        assert self.rate_call is not None, "queue() the admission first"
        return self.rate_call

    @property
    def queued_reserve_call(self) -> BudgetReserveCall:
        assert self.reserve_call is not None, "queue() the admission first"
        return self.reserve_call

    def queue(self, pipe, *, marker: str | None = None) -> None:
        """``marker``: a key the rate limits' script sets when it admits (``AdmissionGate``)."""
        schema_name = self.caller.tenant.schema_name
        self.first = len(pipe)
        self.rate_call = rate_limit_queue(
            pipe, schema_name=schema_name, limits=self.limits, costs=self.costs, marker=marker
        )
        self.reserve_call = budget_reserve_queue(
            pipe,
            tenant_schema=schema_name,
            limits=self.budgets,
            tokens=self.estimate,
            reservation_id=self.reservation_id,
        )

    @property
    def ticket(self) -> dict:
        """The ticket the admission will carry if it succeeds (known once queued)."""
        return _ticket(self.caller, self.estimate, self.queued_reserve_call.reservation, self.token_limits)

    @property
    def reservation_key(self) -> str | None:
        """The budget reservation's key, which exists once it is made; None: no budget applies."""
        return self.queued_reserve_call.keys[1] if self.queued_reserve_call.limits else None

    @property
    def is_rate_limited(self) -> bool:
        """Whether a rate limit applies (the script was queued)."""
        return bool(self.queued_rate_call.keys)

    def _replies(self, replies: list) -> tuple[Any, Any]:
        """(the rate limits' reply, the reservation's), each None when not queued."""
        index = self.first
        rate_reply = replies[index] if self.queued_rate_call.keys else None
        index += 1 if self.queued_rate_call.keys else 0
        reserve_reply = replies[index] if self.queued_reserve_call.limits else None
        return rate_reply, reserve_reply

    async def finish(self, replies: list | None) -> Admission:
        """The admission, from the pipeline's replies (None: Redis was unreachable: each check on
        its own, with its own rule — admit; 503); raises RateLimited (429) or BudgetExceeded (402)."""
        schema_name = self.caller.tenant.schema_name
        if replies is None:
            decision = await rate_limit_async(schema_name=schema_name, limits=self.limits, costs=self.costs)
        else:
            rate_reply, reserve_reply = self._replies(replies)
            decision = await rate_limit_finish_async(self.queued_rate_call, rate_reply)
        if not decision.allowed:
            if replies is not None:
                await budget_reserve_undo_async(self.queued_reserve_call, reserve_reply)
            raise RateLimited.from_decision(decision)
        try:
            if replies is None:
                reservation = await budget_reserve_async(
                    tenant_schema=schema_name,
                    limits=self.budgets,
                    tokens=self.estimate,
                    reservation_id=self.reservation_id,
                )
            else:
                reservation = await budget_reserve_finish_async(self.queued_reserve_call, reserve_reply)
        except BudgetExceeded:
            await tokens_charge_async(
                schema_name=schema_name, limits=self.token_limits, tokens=0, reserved=self.estimate
            )
            raise
        return _admission(self.caller, decision, self.estimate, reservation, self.token_limits)

    async def undo(self, replies: list) -> None:
        """Give back whatever the queued scripts took (the request goes no further this way): the
        request and its tokens to the rate limits, the tokens to the budgets."""
        rate_reply, reserve_reply = self._replies(replies)
        if isinstance(rate_reply, list) and int(rate_reply[0]):
            await rate_limit_refund_async(
                schema_name=self.caller.tenant.schema_name, limits=self.limits, costs=self.costs
            )
        await budget_reserve_undo_async(self.queued_reserve_call, reserve_reply)


# KEYS: the poison key (watched by the caller's transaction), the client's brute-force key, the
#       rate limits' marker (when ARGV[1] == '1'), the budget reservation (when ARGV[2] == '1'),
#       then the keys whose values must be unchanged.
# ARGV[3..]: those values.
# Returns 1 when the admission holds; otherwise 0, having set the poison key.
_GATE_SCRIPT = lua_source("chat/lua/admission_gate.lua")


@dataclass(slots=True)
class AdmissionGate:
    """A known API key's admission and its turn's writes in one round trip (the edge's first
    request with a known key; chat.transports.openai_edge), all on one pipeline:

    ``WATCH poison`` · the key's confirmation · the admission's scripts (the rate limits setting
    a marker when they admit) · the gate's script · ``MULTI`` · the turn's writes · ``EXEC``.

    The gate's script finds the marker, the budget reservation and the key's cache entries as
    they must be — or sets the poison key, which aborts the transaction: a WATCHed key's change
    aborts its EXEC even when the change is the same connection's. Every check is positive, so
    a script that did not run (NOSCRIPT after a Redis restart, an error) fails the gate rather
    than letting the turn through; the gate's own script goes by its text for that reason (the
    admission's, by SHA1). When the transaction aborts, the caller finishes (or undoes) the
    admission from its replies as without a gate, then queues the turn in a round trip of its own.
    """

    poison: str
    marker: str
    exec_index: int = 0  # where the EXEC's reply is among the pipeline's

    @classmethod
    def of(cls, queued: QueuedAdmission) -> AdmissionGate:
        gate_key = tenant_key(queued.caller.tenant.schema_name, "gate", queued.reservation_id)
        return cls(poison=gate_key, marker=f"{gate_key}:admitted")

    def watch(self, pipe) -> None:
        """First on the pipeline. (Queued as it is: redis-py would run a WATCH at once.)"""
        pipe.pipeline_execute_command("WATCH", self.poison)

    def check(self, pipe, queued: QueuedAdmission, *, keys: list[str], values: list[bytes], absent: str) -> None:
        """After the admission's scripts (``queued.queue(pipe, marker=self.marker)``): ``keys``
        must still hold ``values``, ``absent`` must not exist."""
        has_marker = queued.is_rate_limited
        reservation = queued.reservation_key
        gate_keys = [self.poison, absent, *([self.marker] if has_marker else [])]
        gate_keys += [reservation] if reservation else []
        pipe.eval(
            _GATE_SCRIPT,
            len(gate_keys) + len(keys),
            *gate_keys,
            *keys,
            "1" if has_marker else "0",
            "1" if reservation else "0",
            *values,
        )

    def begin(self, pipe) -> int:
        """``MULTI``; returns where the transaction's commands start on ``pipe``."""
        pipe.pipeline_execute_command("MULTI")
        return len(pipe)

    def commit(self, pipe) -> None:
        self.exec_index = len(pipe)
        pipe.pipeline_execute_command("EXEC")

    def committed(self, replies: list) -> list | None:
        """The transaction's replies; None when it aborted (or did not run)."""
        reply = replies[self.exec_index]
        return reply if isinstance(reply, list) else None


def _admission(
    caller: Caller, decision, estimate: int, reservation: Reservation, token_limits: list[Limit]
) -> Admission:
    return Admission(headers=rate_limit_headers(decision), ticket=_ticket(caller, estimate, reservation, token_limits))


def _ticket(caller: Caller, estimate: int, reservation: Reservation, token_limits: list[Limit]) -> dict:
    return {
        "estimate": estimate,
        "reservation": reservation.to_dict(),
        "token_limits": [_limit_dict(limit) for limit in token_limits],
        "bot": caller.bot_public_id,
        "api_key_id": caller.api_key_id,
        "end_user": caller.end_user,
    }


def _usage_event(ticket: dict, **fields) -> UsageEvent:
    return UsageEvent(
        event_id=fields["event_id"],
        tenant_schema=fields["schema_name"],
        bot=ticket.get("bot", ""),
        api_key_id=ticket.get("api_key_id"),
        end_user=ticket.get("end_user", ""),
        provider=fields["provider"] or "",
        model=fields["model"] or "",
        tokens_in=max(0, fields["tokens_in"]),
        tokens_out=max(0, fields["tokens_out"]),
        cached=bool(fields["cache_layer"]),
        cache_layer=fields["cache_layer"],
        latency_ms=round(fields["latency_ms"], 2),
        ttft_ms=fields["ttft_ms"],
        occurred_at=datetime.now(UTC),
    )


@dataclass(frozen=True, slots=True)
class QueuedSettlement:
    """A settlement queued on a pipeline (``settle_queue``); ``finish`` reads its replies."""

    reservation: Reservation
    budget_index: int | None  # the budget script's reply among the pipeline's results

    async def finish(self, results: list) -> None:
        if self.budget_index is not None:
            await budget_settle_finish(reservation=self.reservation, result=results[self.budget_index])


def settle_queue(pipe, ticket: dict, **fields) -> QueuedSettlement:
    """``settle`` queued on ``pipe`` (an asyncio pipeline without a transaction): the generation
    worker ends a turn — answer, settlement, usage, terminal event — in one round trip."""
    billable = 0 if fields["cache_layer"] else fields["tokens_in"] + fields["tokens_out"]
    reservation = Reservation.from_dict(ticket["reservation"])
    index = len(pipe)
    budget_index = index if budget_settle_queue(pipe, reservation=reservation, actual_tokens=billable) else None
    limits = [Limit(**item) for item in ticket.get("token_limits", [])]
    if limits:
        tokens_charge_queue(
            pipe, schema_name=fields["schema_name"], limits=limits, tokens=billable, reserved=ticket["estimate"]
        )
    usage_record_queue(pipe, _usage_event(ticket, **fields))
    return QueuedSettlement(reservation=reservation, budget_index=budget_index)


async def settle(ticket: dict, **fields) -> None:
    """After the turn: settle the reservation (a cached answer costs nothing), charge the real
    tokens per minute, and record the usage event — ``settle_queue`` in a round trip of its own.
    Idempotent per reservation and event id.

    ``fields``: schema_name, event_id, provider, model, tokens_in, tokens_out, cache_layer,
    latency_ms, ttft_ms. With Redis unreachable the usage event still reaches PostgreSQL
    (``usage_record_async``'s fallback); the reservation then expires on its own."""
    redis = get_loop_redis()
    try:
        async with redis.pipeline(transaction=False) as pipe:
            settlement = settle_queue(pipe, ticket, **fields)
            await settlement.finish(await execute_with_scripts(pipe, redis))
    except REDIS_UNAVAILABLE:
        await usage_record_async(_usage_event(ticket, **fields))
