"""The one door into a turn: :func:`turn_begin`.

Every transport — the OpenAI API at the ASGI edge and through Django, REST + SSE, the widget,
WebSocket (browser visitors and API-key clients), the admin preview — resolves its caller
(chat.callers), decodes its wire format to JSON, calls ``turn_begin``, and renders the started
turn's events in its own format. Here, once, in this order:

1. **scope**: the caller holds ``chat`` (tenants.permissions.scope_require);
2. **validation**: the input contract (chat.turn_input): strict types, storable text, bounds;
3. **the bot** of the caller's configuration epoch (chat.snapshots: memory, no SQL);
4. **admission**: rate limits and the budget reservation (chat.admission), with the widget's
   per-address limit for visitors;
5. **the exact response cache**, read in the admission's round trip when the answer would be
   cached; a hit is answered here, with no worker;
6. **enqueue**: one Redis transaction writes the messages (to the write stream and the hot
   store), the generation's owner and first event, and the job (chat.turn_job) for the workers.

The fast path is internal: an API key this process accepted before (``ApiKeyCredential.known``)
is confirmed unchanged in the admission's round trip, and when the answer cannot come from the
cache the turn's writes ride in that same round trip behind chat.admission.AdmissionGate. If the
confirmation does not hold, the key is authenticated in full and the turn takes the ordinary path.
Nothing here touches SQL: a refused turn leaves nothing behind (no row, no charge, no job).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from django.utils import timezone

from chat import admission as admission_api
from chat import engine, response_cache
from chat.admission import Admission, AdmissionGate, Caller, QueuedAdmission
from chat.callers import TurnCaller, api_key_caller, caller_with_external_user
from chat.engine import TurnOutcome
from chat.memory import persistence
from chat.memory.records import record_new, timestamp_of
from chat.models import Conversation
from chat.snapshots import BotSnapshot, bot_snapshot_get
from chat.streams import (
    JOBS_STREAM,
    STARTED_EVENT,
    STREAM_TTL_SECONDS,
    StreamEvent,
    entry_id_of,
    generation_owner_key,
    generation_stream_key,
)
from chat.turn_input import (
    ChatCompletionInput,
    ChatMessage,
    MessageInput,
    chat_completion_parse,
    conversation_title,
    message_input_parse,
)
from chat.turn_job import TurnContext, TurnJob
from tenants.authentication import api_key_confirm_queue, api_key_confirmed, api_key_unchanged_condition
from tenants.config_epoch import epoch_async
from tenants.errors import NotFound, ParleyError
from tenants.permissions import scope_require
from tenants.redis import REDIS_UNAVAILABLE, execute_with_scripts, get_loop_redis

logger = structlog.get_logger(__name__)

# Room for the retrieved passages in a turn's token estimate (five chunks of about 200 tokens).
SOURCES_CHARS_ESTIMATE = 4_000


# --- what a transport hands in ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """A stored conversation the caller may write to (the transport's selector checked access)."""

    id: str
    bot_id: int
    end_user_kind: str
    end_user_id: str
    title: str
    summary: str
    summary_until_ts: int
    is_empty: bool  # no message stored yet

    @classmethod
    def of(cls, conversation: Conversation) -> ConversationRef:
        return cls(
            id=str(conversation.pk),
            bot_id=conversation.bot_id,
            end_user_kind=conversation.end_user_kind,
            end_user_id=conversation.end_user_id,
            title=conversation.title,
            summary=conversation.summary,
            summary_until_ts=conversation.summary_until_ts,
            is_empty=conversation.last_message_at is None,
        )


@dataclass(frozen=True, slots=True)
class ExchangeTurn:
    """A stateless caller's whole exchange (the OpenAI API): ``body`` as decoded JSON. It becomes
    a new conversation of the caller's end user."""

    body: Any


@dataclass(frozen=True, slots=True)
class ConversationTurn:
    """A new message (``body``: ``{"content", "stream"}`` as decoded JSON) in a stored conversation
    (``conversation``), or in a new one of the caller's end user (None). ``always_streams``: the
    widget and WebSocket, whose bodies have no ``stream`` field; ``accepts_event_stream``: a REST
    client that asked for SSE in its Accept header."""

    bot_public_id: str
    body: Any
    conversation: ConversationRef | None = None
    always_streams: bool = False
    accepts_event_stream: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """How the transport will follow the turn: the generation's id (known before the job is
    queued, so a follower can register first) and the web process's inbox (chat.transports.hub)."""

    generation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    inbox: str | None = None


@dataclass(frozen=True, slots=True)
class StartedTurn:
    generation_id: str
    conversation: ConversationRef  # the turn's conversation as it stands now (its row may be queued still)
    stream_key: str
    bot: BotSnapshot
    caller: TurnCaller  # as finally resolved (the fast path may have authenticated in full)
    input: ChatCompletionInput | MessageInput
    user_record: dict[str, Any]  # the new message, as stored (chat.memory.records)
    headers: dict[str, str]  # the admission's rate-limit headers
    cache_layer: str | None  # "exact" when answered from the response cache here
    created_event_id: str  # the stream's first entry (message.created), written with the job
    events: list[StreamEvent] = field(default_factory=list)  # a cached answer's, when answered so

    @property
    def is_streamed(self) -> bool:
        return self.input.is_streamed

    @property
    def conversation_id(self) -> str:
        return self.conversation.id


# --- the door -----------------------------------------------------------------------------------


async def turn_begin(
    caller: TurnCaller,
    turn: ExchangeTurn | ConversationTurn,
    *,
    delivery: Delivery | None = None,
    redis=None,
) -> StartedTurn:
    """Start a turn: scope → validation → bot → admission → cache → enqueue (see the module's
    docstring). Raises the API's errors (403, 400, 404, 429, 402, 401, 503) before anything is
    charged or stored."""
    delivery = delivery or Delivery()
    redis = redis or get_loop_redis()
    credential = caller.credential
    try:
        scope_require(caller.scopes, "chat")
        parsed, bot_public_id = _parse(turn)
    except ParleyError:
        if credential is not None and credential.known is not None:  # a refused key is told so first
            await _authenticate_in_full(caller, redis)
        raise
    if isinstance(parsed, ChatCompletionInput):
        caller = caller_with_external_user(caller, parsed.user)
    epoch = caller.epoch or await epoch_async(redis)
    bot = await _bot(caller, epoch, bot_public_id, turn)
    prepared = await _prepare(caller, bot, parsed, turn, delivery, epoch)
    if credential is not None and credential.known is not None:
        started = await _begin_known(caller, prepared, redis)
        if started is not None:
            return started
        # Something about the key changed since this process accepted it: in full, which words
        # any refusal, then the ordinary path.
        caller = await _authenticate_in_full(caller, redis)
        scope_require(caller.scopes, "chat")
        epoch = caller.epoch or epoch
        bot = await _bot(caller, epoch, bot_public_id, turn)
        prepared = await _prepare(caller, bot, parsed, turn, delivery, epoch)
    return await _begin(caller, prepared, redis)


async def _authenticate_in_full(caller: TurnCaller, redis) -> TurnCaller:
    credential = caller.credential
    assert credential is not None
    return await api_key_caller(
        credential.raw_key,
        host=credential.host,
        client_ip=caller.client_ip,
        redis=redis,
        external_user=caller.external_user,
        allow_known=False,
    )


def _parse(turn: ExchangeTurn | ConversationTurn) -> tuple[ChatCompletionInput | MessageInput, str]:
    if isinstance(turn, ExchangeTurn):
        parsed = chat_completion_parse(turn.body)
        return parsed, parsed.model
    message = message_input_parse(turn.body, allow_stream=not turn.always_streams)
    if turn.always_streams or turn.accepts_event_stream:
        message = dataclasses.replace(message, is_streamed=True)
    return message, turn.bot_public_id


async def _bot(caller: TurnCaller, epoch: bytes, public_id: str, turn) -> BotSnapshot:
    bot = await bot_snapshot_get(schema_name=caller.tenant.schema_name, epoch=epoch, public_id=public_id)
    conversation = getattr(turn, "conversation", None)
    if bot is None or (conversation is not None and conversation.bot_id != bot.pk):
        if isinstance(turn, ExchangeTurn):
            raise NotFound(
                f"The model {public_id!r} does not exist: use a bot id from /v1/models.",
                param="model",
                code="model_not_found",
            )
        raise NotFound(f"No bot with id {public_id!r}.", param="bot")
    return bot


# --- preparing the turn's writes ----------------------------------------------------------------


@dataclass(slots=True)
class _PreparedTurn:
    """A turn ready to queue: its admission (not yet sent) and its writes."""

    caller: TurnCaller
    bot: BotSnapshot
    input: ChatCompletionInput | MessageInput
    queued: QueuedAdmission
    job: TurnJob
    records: list[dict[str, Any]]
    conversation_row: dict[str, Any] | None  # for the batch writer: a new conversation, or a title
    is_new_conversation: bool
    conversation: ConversationRef  # as it will stand once the turn's writes land
    lookup: tuple[response_cache.CacheScope, str] | None  # the exact cache entry to read
    started_at: float = 0.0
    outcome: TurnOutcome | None = None
    hit: response_cache.CachedAnswer | None = None
    created_reply: int = 0  # where the first event's entry id is among the transaction's replies
    cached_events: list[tuple[int, str, dict]] = field(default_factory=list)  # a hit's, likewise

    @property
    def stream_key(self) -> str:
        return generation_stream_key(self.job.schema_name, self.job.generation_id)


def _admission_caller(caller: TurnCaller, bot: BotSnapshot) -> Caller:
    return Caller(
        tenant=caller.tenant,
        bot_id=bot.pk,
        bot_public_id=bot.public_id,
        bot_rate_limits=bot.rate_limits,
        api_key_id=caller.api_key_id,
        end_user=caller.end_user.id,
        is_end_user_limited=caller.is_end_user_limited,
        visitor_address=(caller.client_ip or "unknown") if caller.is_visitor else None,
    )


async def _prepare(
    caller: TurnCaller,
    bot: BotSnapshot,
    parsed: ChatCompletionInput | MessageInput,
    turn: ExchangeTurn | ConversationTurn,
    delivery: Delivery,
    epoch: bytes,
) -> _PreparedTurn:
    schema_name = caller.tenant.schema_name
    now = timezone.now()
    ts = timestamp_of(now)
    conversation = getattr(turn, "conversation", None)
    if isinstance(parsed, ChatCompletionInput):
        messages, overrides = parsed.messages, parsed.overrides
    else:
        messages, overrides = (ChatMessage(role="user", content=parsed.content),), {}
    conversation_id = conversation.id if conversation is not None else str(uuid.uuid4())
    records = [
        record_new(
            conversation_id=conversation_id,
            role="system" if message.role == "developer" else message.role,
            content=message.content,
            ts=ts + index,  # a microsecond apart, in order
        )
        for index, message in enumerate(messages)
    ]
    records[-1]["generation_id"] = delivery.generation_id
    user_record = records[-1]
    title = conversation_title(user_record["content"])
    if conversation is None:  # a new conversation: its row goes to the batch writer with its messages
        after = ConversationRef(
            id=conversation_id,
            bot_id=bot.pk,
            end_user_kind=caller.end_user.kind,
            end_user_id=caller.end_user.id[:200],
            title=title,
            summary="",
            summary_until_ts=0,
            is_empty=False,
        )
        context = TurnContext(
            bot_id=bot.pk,
            epoch=epoch.decode(),
            earlier=records[:-1],
            inbox=delivery.inbox,
            inbox_events=delivery.inbox is not None,
        )
    else:
        after = dataclasses.replace(conversation, title=conversation.title or title, is_empty=False)
        context = TurnContext(
            bot_id=bot.pk,
            summary=conversation.summary,
            summary_until_ts=conversation.summary_until_ts,
            inbox=delivery.inbox,
            inbox_events=delivery.inbox is not None,
        )
    row = None
    if conversation is None or not conversation.title:  # the title, when it has none: its first message
        row = persistence.conversation_record(
            conversation_id=conversation_id,
            bot_id=bot.pk,
            end_user_kind=after.end_user_kind,
            end_user_id=after.end_user_id,
            title=title,
            ts=ts,
        )
    prompt_chars = sum(len(message.content) for message in messages) + len(bot.system_prompt) + SOURCES_CHARS_ESTIMATE
    queued = await admission_api.admission_prepare(
        caller=_admission_caller(caller, bot),
        prompt_chars=prompt_chars,
        max_tokens=overrides.get("max_tokens", bot.generation.get("max_tokens")),
        epoch=epoch,
    )
    job = TurnJob(
        schema_name=schema_name,
        generation_id=delivery.generation_id,
        conversation_id=conversation_id,
        user_message_id=user_record["id"],
        user_content=user_record["content"],
        user_message_ts=user_record["ts"],
        overrides=overrides,
        is_streamed=parsed.is_streamed,
        context=context,
    )
    prepared = _PreparedTurn(
        caller=caller,
        bot=bot,
        input=parsed,
        queued=queued,
        job=job,
        records=records,
        conversation_row=row,
        is_new_conversation=conversation is None or conversation.is_empty,
        conversation=after,
        lookup=None,
    )
    # The door answers an exact hit itself when it holds the history the key covers: a new or
    # empty conversation's (the request's own). Later turns of a stored conversation are looked up
    # by the worker, which reads their history anyway.
    holds_history = conversation is None or conversation.is_empty
    if holds_history and response_cache.is_cacheable({**bot.generation, **overrides}, cache_settings=bot.cache):
        prepared.lookup = _exact_lookup(job, bot, records[:-1])
    return prepared


def _exact_lookup(job: TurnJob, bot: BotSnapshot, earlier: list[dict]) -> tuple[response_cache.CacheScope, str] | None:
    inputs = engine.inputs_from(job, bot, earlier, summary="", summary_until_ts=0)
    lookup = engine.cache_request(job, inputs)
    if lookup is None:
        return None
    key = response_cache.exact_entry_key(lookup.scope, exact=lookup.exact, cache_settings=inputs.cache)
    return None if key is None else (lookup.scope, key)


# --- admission and enqueue ----------------------------------------------------------------------


async def _begin(caller: TurnCaller, prepared: _PreparedTurn, redis) -> StartedTurn:
    """The ordinary path: the admission (and the exact cache entry) in one round trip, then the
    turn's writes in a transaction of their own."""
    queued = prepared.queued
    replies: list | None
    try:
        async with redis.pipeline(transaction=False) as pipe:
            queued.queue(pipe)
            lookup_index = len(pipe)
            if prepared.lookup is not None:
                pipe.get(prepared.lookup[1])
            replies = await pipe.execute(raise_on_error=False) if len(pipe) else []
    except REDIS_UNAVAILABLE:
        replies = None  # each check then on its own, with its own rule (admit, or 503)
    admission = await queued.finish(replies)
    return await _start(prepared, admission, redis, hit=_exact_hit(prepared, replies, lookup_index))


async def _begin_known(caller: TurnCaller, prepared: _PreparedTurn, redis) -> StartedTurn | None:
    """The fast path for a key this process accepted before: its confirmation rides in the
    admission's round trip, and so do the turn's writes (behind the gate) when the answer cannot
    come from the cache. None — after giving back what the admission took — when anything about
    the key changed (the caller then authenticates in full)."""
    known = caller.credential.known if caller.credential is not None else None
    assert known is not None
    queued = prepared.queued
    gate = None if prepared.lookup is not None else AdmissionGate.of(queued)
    client_ip = caller.client_ip
    try:
        async with redis.pipeline(transaction=False) as pipe:
            if gate is not None:
                gate.watch(pipe)
            confirmation = api_key_confirm_queue(pipe, known, client_ip=client_ip, peek=gate is None)
            queued.queue(pipe, marker=gate.marker if gate is not None else None)
            prepared.job = dataclasses.replace(prepared.job, gateway=queued.ticket)
            lookup_index = len(pipe)
            if gate is not None:
                keys, values, absent = api_key_unchanged_condition(known, client_ip=client_ip)
                gate.check(pipe, queued, keys=keys, values=values, absent=absent)
                _queue_writes(pipe, prepared, first=gate.begin(pipe))
                gate.commit(pipe)
            elif prepared.lookup is not None:
                pipe.get(prepared.lookup[1])
            replies = await pipe.execute(raise_on_error=False)
    except REDIS_UNAVAILABLE:
        return None  # the ordinary path has the rules for Redis being away
    committed = gate.committed(replies) if gate is not None else None
    is_confirmed = await api_key_confirmed(
        known, replies, confirmation, client_ip=client_ip, is_unthrottled=committed is not None
    )
    if committed is None and not is_confirmed:
        await queued.undo(replies)
        return None
    admission = await queued.finish(replies)
    if committed is not None:
        return await _started(prepared, committed, admission, redis)
    return await _start(prepared, admission, redis, hit=_exact_hit(prepared, replies, lookup_index))


def _exact_hit(prepared: _PreparedTurn, replies: list | None, index: int) -> response_cache.CachedAnswer | None:
    """The exact cache entry read at ``index`` of the admission's round trip, if any and found."""
    if replies is None or prepared.lookup is None or isinstance(replies[index], Exception):
        return None
    return response_cache.exact_answer(prepared.lookup[0], replies[index])


async def _start(
    prepared: _PreparedTurn, admission: Admission, redis, *, hit: response_cache.CachedAnswer | None
) -> StartedTurn:
    """The turn's writes (or its cached answer's) in a transaction of their own."""
    prepared.job = dataclasses.replace(prepared.job, gateway=admission.ticket)
    async with redis.pipeline(transaction=True) as pipe:
        _queue_writes(pipe, prepared, hit=hit)
        replies = await pipe.execute()
    return await _started(prepared, replies, admission, redis)


def _owner(conversation: ConversationRef) -> dict[str, str]:
    """Who may follow or cancel the generation (chat.turns.generation_get_for)."""
    return {
        "conversation_id": conversation.id,
        "end_user_kind": conversation.end_user_kind,
        "end_user_id": conversation.end_user_id[:200],
    }


def _queue_writes(
    pipe, prepared: _PreparedTurn, *, hit: response_cache.CachedAnswer | None = None, first: int = 0
) -> None:
    """On ``pipe`` (``first``: where the transaction's commands start): the messages for the batch
    writer and the hot store, the generation's owner and first event, then the job — or, for an
    exact cache ``hit``, the answer and its events."""
    job = prepared.job
    prepared.hit = hit
    prepared.started_at = time.perf_counter()
    persistence.queue_on(
        pipe,
        schema_name=job.schema_name,
        conversation_id=job.conversation_id,
        records=prepared.records,
        is_new_conversation=prepared.is_new_conversation,
        conversation=prepared.conversation_row,
    )
    stream_key = prepared.stream_key
    pipe.set(
        generation_owner_key(job.schema_name, job.generation_id),
        orjson.dumps(_owner(prepared.conversation)),
        ex=STREAM_TTL_SECONDS,
    )
    prepared.created_reply = len(pipe) - first
    created = {
        "generation_id": job.generation_id,
        "conversation_id": job.conversation_id,
        "message_id": job.user_message_id,
    }
    pipe.xadd(stream_key, {"type": "message.created", "data": orjson.dumps(created)})
    pipe.expire(stream_key, STREAM_TTL_SECONDS)
    # No notification: nobody follows a generation before it is started; its followers read what
    # was written before they came (chat.transports.hub).
    if hit is None:
        pipe.xadd(JOBS_STREAM, {"job": orjson.dumps(job.to_wire())})
        prepared.outcome, prepared.cached_events = None, []
        return
    outcome = engine.cached_outcome(hit, prepared.started_at)
    answer = engine.answer_record(job, outcome)
    outcome.message_id = answer["id"]
    persistence.queue_on(pipe, schema_name=job.schema_name, conversation_id=job.conversation_id, records=[answer])
    events = [
        (STARTED_EVENT, {"cache": hit.layer}),
        *(("citation", citation) for citation in outcome.citations),
        ("token", {"text": outcome.text}),
        ("done", engine.done_event(outcome)),
    ]
    prepared.outcome, prepared.cached_events = outcome, []
    for event_type, data in events:
        prepared.cached_events.append((len(pipe) - first, event_type, data))
        pipe.xadd(stream_key, {"type": event_type, "data": orjson.dumps(data)})


async def _started(prepared: _PreparedTurn, replies: list, admission: Admission, redis) -> StartedTurn:
    """The started turn from its transaction's replies; a cached answer settled with the admission
    (the one settlement: chat.admission.settle_queue) in one round trip."""
    job = prepared.job
    if prepared.outcome is not None:
        engine.record_metrics(job, prepared.outcome)
        assert job.gateway is not None  # the admission's ticket, set on the job before its writes
        try:
            async with redis.pipeline(transaction=False) as pipe:
                settlement = admission_api.settle_queue(pipe, job.gateway, **engine.settlement(job, prepared.outcome))
                await settlement.finish(await execute_with_scripts(pipe, redis))
        except Exception:  # bookkeeping must not fail an answer already given; the reservation expires
            logger.exception("cache_hit_settle_failed", generation_id=job.generation_id)
    return StartedTurn(
        generation_id=job.generation_id,
        conversation=prepared.conversation,
        stream_key=prepared.stream_key,
        bot=prepared.bot,
        caller=prepared.caller,
        input=prepared.input,
        user_record=prepared.records[-1],
        headers=admission.headers,
        cache_layer=prepared.hit.layer if prepared.hit is not None else None,
        created_event_id=entry_id_of(replies[prepared.created_reply]),
        events=[
            StreamEvent(id=entry_id_of(replies[index]), type=event_type, data=data)
            for index, event_type, data in prepared.cached_events
        ],
    )
