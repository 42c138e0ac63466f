"""Starting, following and cancelling a turn from the web side (sync services for the views).

``turn_start`` stores the user's message and hands the turn to the generation workers; the
caller then relays the generation's event stream (chat.streams) to its client.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import orjson
import structlog
from django.db import connection
from django.utils import timezone
from redis import exceptions as redis_exceptions

from chat import engine, gateway, response_cache
from chat.engine import TurnJob, TurnOutcome
from chat.gateway import Admission, Caller, admit
from chat.memory import persistence
from chat.memory.records import message_of, record_new, record_of, timestamp_of
from chat.models import Bot, Conversation, Message
from chat.response_cache import CachedAnswer
from chat.selectors import EndUser
from chat.snapshots import BotSnapshot
from chat.streams import (
    JOBS_STREAM,
    STARTED_EVENT,
    STREAM_TTL_SECONDS,
    StreamEvent,
    cancel_key,
    entry_id_of,
    generation_owner_key,
    generation_stream_key,
)
from tenants.errors import NotFound, ParleyError, ValidationFailed
from tenants.redis import execute_with_scripts, get_redis

logger = structlog.get_logger(__name__)

MAX_MESSAGE_CHARS = 32_000


@dataclass(frozen=True, slots=True)
class StartedTurn:
    generation_id: str
    conversation: Conversation
    user_message: Message
    stream_key: str
    headers: dict = field(default_factory=dict)  # the gateway's rate-limit headers


# Room for the retrieved passages in a turn's token estimate (five chunks of about 200 tokens).
SOURCES_CHARS_ESTIMATE = 4_000


def _admit(caller: Caller | None, *, bot: Bot, prompt_chars: int, overrides: dict) -> Admission | None:
    """The gateway (rate limits, budget) before anything is stored: a refused turn leaves no trace."""
    if caller is None:
        return None
    max_tokens = overrides.get("max_tokens", (bot.generation or {}).get("max_tokens"))
    return admit(
        caller=caller,
        prompt_chars=prompt_chars + len(bot.system_prompt) + SOURCES_CHARS_ESTIMATE,
        max_tokens=max_tokens,
    )


def validate_content(content: object) -> str:
    if not isinstance(content, str) or not content.strip():
        raise ValidationFailed("content must be a non-empty string.", param="content")
    if len(content) > MAX_MESSAGE_CHARS:
        raise ValidationFailed(
            f"content is longer than {MAX_MESSAGE_CHARS} characters.", param="content", code="message_too_long"
        )
    if "\x00" in content:
        raise ValidationFailed("content must not contain NUL characters.", param="content")
    return content


def turn_start(
    *, conversation: Conversation, content: str, is_streamed: bool = True, caller: Caller | None = None
) -> StartedTurn:
    """Store the user's message and hand the turn to the generation workers (after the gateway
    admits it, when the turn comes from outside: ``caller``)."""
    content = validate_content(content)
    admission = _admit(caller, bot=conversation.bot, prompt_chars=len(content) * 2, overrides={})
    if conversation._state.adding:  # a new conversation, stored only for an admitted turn
        conversation.save()
    generation_id = str(uuid.uuid4())
    # Not written here: the message goes to the write stream and the hot store with the job, in
    # one Redis transaction (chat.memory.persistence); the flusher stores it within a second.
    message = Message(conversation=conversation, role=Message.Role.USER, content=content, generation_id=generation_id)
    if not conversation.title:
        Conversation.objects.filter(pk=conversation.pk, title="").update(title=content.strip()[:80])
    return _enqueue(
        conversation=conversation,
        messages=[message],
        generation_id=generation_id,
        overrides={},
        is_streamed=is_streamed,
        admission=admission,
        is_new_conversation=conversation.last_message_at is None,
    )


def turn_start_from_messages(
    *,
    bot: Bot,
    end_user: EndUser,
    messages: list[dict],
    overrides: dict,
    is_streamed: bool = True,
    caller: Caller | None = None,
) -> StartedTurn:
    """A stateless caller (the OpenAI API) sends the whole exchange: store it as a conversation of
    its end user, the last message being the new user turn."""
    validate_content(messages[-1]["content"])
    admission = _admit(
        caller, bot=bot, prompt_chars=sum(len(item["content"]) for item in messages), overrides=overrides
    )
    generation_id = str(uuid.uuid4())
    now = timezone.now()
    # The conversation row now (messages refer to it); its messages through the write stream.
    conversation = Conversation.objects.create(
        bot=bot,
        end_user_kind=end_user.kind,
        end_user_id=end_user.id[:200],
        title=messages[-1]["content"].strip()[:80],
        last_message_at=now,
    )
    records = _message_records(str(conversation.pk), messages, generation_id=generation_id, now=now)
    rows = [message_of(record) for record in records]
    return _enqueue(
        earlier=records[:-1],
        conversation=conversation,
        messages=rows,
        generation_id=generation_id,
        overrides=overrides,
        is_streamed=is_streamed,
        admission=admission,
        is_new_conversation=True,
    )


def _message_records(conversation_id: str, messages: list[dict], *, generation_id: str, now) -> list[dict]:
    """A stateless caller's exchange as records of its conversation's messages (a microsecond
    apart, in order), the last one the new turn's."""
    ts = timestamp_of(now)
    records = [
        record_new(
            conversation_id=conversation_id,
            role="system" if item["role"] == "developer" else item["role"],
            content=item["content"],
            ts=ts + index,
        )
        for index, item in enumerate(messages)
    ]
    records[-1]["generation_id"] = generation_id
    return records


def _queue_turn(
    pipe, job: TurnJob, *, owner: dict, created: dict, hit: CachedAnswer | None, started_at: float
) -> tuple[TurnOutcome | None, int, list[tuple[int, str, dict]]]:
    """After the messages on ``pipe``: the generation's owner and first event, then the job for the
    workers — or, for an exact cache hit, the answer itself. Returns the cache hit's outcome, where
    the first event's entry id will be among the pipeline's replies, and the hit's events (where
    each one's entry id will be, its type, its data)."""
    stream_key = generation_stream_key(job.schema_name, job.generation_id)
    pipe.set(generation_owner_key(job.schema_name, job.generation_id), orjson.dumps(owner), ex=STREAM_TTL_SECONDS)
    created_reply = len(pipe)
    pipe.xadd(stream_key, {"type": "message.created", "data": orjson.dumps(created)})
    pipe.expire(stream_key, STREAM_TTL_SECONDS)
    # No notification: nobody follows a generation before it is started; its followers read what
    # was written before they came (chat.transports.hub).
    if hit is None:
        pipe.xadd(JOBS_STREAM, {"job": orjson.dumps(job.as_dict())})
        return None, created_reply, []
    outcome, events = _answer_from_cache(pipe, job, hit, started_at)
    return outcome, created_reply, events


def admission_estimate(*, bot: BotSnapshot, messages: list[dict], overrides: dict) -> dict:
    """The gateway's estimate of a stateless caller's turn: ``prompt_chars`` and ``max_tokens``
    for ``gateway.admit_async`` / ``admission_prepare``."""
    prompt_chars = sum(len(item["content"]) for item in messages) + len(bot.system_prompt)
    return {
        "prompt_chars": prompt_chars + SOURCES_CHARS_ESTIMATE,
        "max_tokens": overrides.get("max_tokens", bot.generation.get("max_tokens")),
    }


async def turn_start_from_messages_async(
    *,
    bot: BotSnapshot,
    end_user: EndUser,
    messages: list[dict],
    overrides: dict,
    is_streamed: bool,
    admission: Admission,
    epoch: bytes,
    redis,
    generation_id: str | None = None,
    inbox: str | None = None,
) -> AsyncStartedTurn:
    """``turn_start_from_messages`` for the async edge (chat.transports.openai_edge): the same turn
    without SQL or threads, once the gateway has admitted it (``admission_estimate``'s figures) —
    so the new message was checked (``validate_content``) before, by the caller: a refused turn
    must not have counted against the limits. The conversation's row goes to the batch writer
    with its messages (chat.memory.persistence). ``inbox``: the channel the worker notifies
    besides the stream's own (chat.transports.hub)."""
    turn = edge_turn_prepare(
        bot=bot,
        end_user=end_user,
        messages=messages,
        overrides=overrides,
        is_streamed=is_streamed,
        ticket=admission.ticket,
        epoch=epoch,
        generation_id=generation_id,
        inbox=inbox,
    )
    hit = await _edge_exact_hit_async(turn, bot, redis) if edge_is_cacheable(bot, overrides) else None
    return await turn.start(redis, hit=hit, headers=admission.headers)


def edge_turn_prepare(
    *,
    bot: BotSnapshot,
    end_user: EndUser,
    messages: list[dict],
    overrides: dict,
    is_streamed: bool,
    ticket: dict,
    epoch: bytes,
    generation_id: str | None = None,
    inbox: str | None = None,
) -> EdgeTurn:
    """A stateless caller's turn, ready to queue (``EdgeTurn.queue``) in a Redis transaction:
    ``turn_start_from_messages_async`` in steps, for the edge that queues it in its admission's
    round trip (chat.gateway.AdmissionGate). ``ticket``: the admission's (``Admission.ticket``
    or ``QueuedAdmission.ticket``)."""
    schema_name = bot.schema_name
    generation_id = generation_id or str(uuid.uuid4())
    conversation_id = str(uuid.uuid4())
    now = timezone.now()
    records = _message_records(conversation_id, messages, generation_id=generation_id, now=now)
    user_record = records[-1]
    job = TurnJob(
        schema_name=schema_name,
        generation_id=generation_id,
        conversation_id=conversation_id,
        user_message_id=user_record["id"],
        user_content=user_record["content"],
        user_message_ts=user_record["ts"],
        overrides=overrides,
        is_streamed=is_streamed,
        gateway=ticket,
        # The worker needs nothing else: no round trip before it calls the model.
        context={
            "bot_id": bot.pk,
            "summary": "",
            "summary_until_ts": 0,
            "epoch": epoch.decode(),
            "earlier": records[:-1],
            "inbox": inbox,
            "inbox_events": inbox is not None,  # this process reads events from its notifications
        },
    )
    return EdgeTurn(
        job=job,
        records=records,
        conversation=persistence.conversation_record(
            conversation_id=conversation_id,
            bot_id=bot.pk,
            end_user_kind=end_user.kind,
            end_user_id=end_user.id,
            title=user_record["content"].strip(),
            ts=timestamp_of(now),
        ),
        owner={"conversation_id": conversation_id, "end_user_kind": end_user.kind, "end_user_id": end_user.id[:200]},
    )


def edge_is_cacheable(bot: BotSnapshot, overrides: dict) -> bool:
    """Whether an exact response-cache hit is possible for the edge's turn: its entry is then
    looked up (``EdgeTurn.exact_lookup``) before the turn is queued."""
    return response_cache.is_cacheable({**bot.generation, **overrides}, cache_settings=bot.cache)


@dataclass(slots=True)
class EdgeTurn:
    """A turn ``edge_turn_prepare`` made: its writes go on a transaction (``queue``), whose replies
    make it started (``started``)."""

    job: TurnJob
    records: list[dict]
    conversation: dict
    owner: dict
    started_at: float = 0.0
    outcome: TurnOutcome | None = None
    hit: CachedAnswer | None = None
    created_reply: int = 0  # where the first event's entry id is among the transaction's replies
    cached_events: list[tuple[int, str, dict]] = field(default_factory=list)  # a hit's, likewise

    @property
    def stream_key(self) -> str:
        return generation_stream_key(self.job.schema_name, self.job.generation_id)

    def exact_lookup(self, bot: BotSnapshot) -> tuple[response_cache.CacheScope, str] | None:
        """The response cache's exact entry for this turn — (its scope, its key) — to GET before
        queueing (``edge_is_cacheable``); None when the answer would not be cached."""
        inputs = engine.inputs_from(self.job, bot, self.records[:-1], summary="", summary_until_ts=0)
        lookup = engine.cache_request(self.job, inputs)
        if lookup is None:
            return None
        key = response_cache.exact_entry_key(lookup.scope, exact=lookup.exact, cache_settings=inputs.cache)
        return None if key is None else (lookup.scope, key)

    async def start(self, redis, *, hit: CachedAnswer | None, headers: dict) -> AsyncStartedTurn:
        """Queue the turn in a transaction of its own (or its cached answer, ``hit``)."""
        async with redis.pipeline(transaction=True) as pipe:
            self.queue(pipe, hit=hit)
            replies = await pipe.execute()
        return await self.started(replies, headers=headers, redis=redis)

    def queue(self, pipe, *, hit: CachedAnswer | None = None, first: int = 0) -> None:
        """The messages (and the conversation's row) for the batch writer and the hot store, the
        generation's owner and first event, then the job — or, for ``hit``, the cached answer.
        ``first``: where the transaction's commands start on ``pipe``."""
        job = self.job
        self.hit = hit
        self.started_at = time.perf_counter()
        persistence.queue_on(
            pipe,
            schema_name=job.schema_name,
            conversation_id=job.conversation_id,
            records=self.records,
            is_new_conversation=True,
            conversation=self.conversation,
        )
        self.outcome, created_reply, events = _queue_turn(
            pipe,
            job,
            owner=self.owner,
            created={
                "generation_id": job.generation_id,
                "conversation_id": job.conversation_id,
                "message_id": job.user_message_id,
            },
            hit=hit,
            started_at=self.started_at,
        )
        self.created_reply = created_reply - first
        self.cached_events = [(index - first, event_type, data) for index, event_type, data in events]

    async def started(self, replies: list, *, headers: dict, redis) -> AsyncStartedTurn:
        """The turn, from its transaction's replies; a cached answer settled with the gateway (in
        one round trip), its events handed back with their entry ids."""
        job = self.job
        if self.outcome is not None:
            engine.record_metrics(job, self.outcome)
            try:
                async with redis.pipeline(transaction=False) as pipe:
                    settlement = gateway.settle_queue(pipe, job.gateway, **engine.settlement(job, self.outcome))
                    await settlement.finish(await execute_with_scripts(pipe, redis))
            except Exception:  # bookkeeping must not fail an answer already given
                logger.exception("edge_cache_settle_failed", generation_id=job.generation_id)
        return AsyncStartedTurn(
            generation_id=job.generation_id,
            conversation_id=job.conversation_id,
            stream_key=self.stream_key,
            headers=headers,
            cache_layer=self.hit.layer if self.hit is not None else None,
            created_event_id=entry_id_of(replies[self.created_reply]),
            events=[
                StreamEvent(id=entry_id_of(replies[index]), type=event_type, data=data)
                for index, event_type, data in self.cached_events
            ],
        )


@dataclass(frozen=True, slots=True)
class AsyncStartedTurn:
    generation_id: str
    conversation_id: str
    stream_key: str
    headers: dict
    cache_layer: str | None  # "exact" when the edge answered from the response cache
    created_event_id: str  # the stream's first entry (message.created), written with the job
    events: list[StreamEvent] = field(default_factory=list)  # the cached answer's, when answered so


async def _edge_exact_hit_async(turn: EdgeTurn, bot: BotSnapshot, redis) -> CachedAnswer | None:
    """``_edge_exact_hit`` for the async edge: the bot's snapshot instead of its row (a cacheable
    turn's: ``edge_is_cacheable``)."""
    try:
        lookup = turn.exact_lookup(bot)
        return None if lookup is None else response_cache.exact_answer(lookup[0], await redis.get(lookup[1]))
    except redis_exceptions.RedisError:
        logger.warning("edge_cache_lookup_failed", exc_info=True)  # the worker will try again
        return None


def _enqueue(
    *,
    conversation: Conversation,
    messages: list[Message],
    generation_id: str,
    overrides: dict,
    is_streamed: bool,
    admission: Admission | None = None,
    is_new_conversation: bool = False,
    earlier: list[dict] | None = None,
) -> StartedTurn:
    """One Redis transaction: the messages into the write stream and the hot store, the
    generation's owner and first event, and the job for the generation workers — or, for an
    exact response-cache hit, the answer itself (no worker involved)."""
    schema_name = connection.schema_name
    message = messages[-1]
    job = TurnJob(
        schema_name=schema_name,
        generation_id=generation_id,
        conversation_id=str(conversation.pk),
        user_message_id=str(message.pk),
        user_content=message.content,
        user_message_ts=timestamp_of(message.created_at),
        overrides=overrides,
        is_streamed=is_streamed,
        gateway=admission.ticket if admission else None,
        context=job_context(conversation),
    )
    stream_key = generation_stream_key(schema_name, generation_id)
    owner = {
        "conversation_id": str(conversation.pk),
        "end_user_kind": conversation.end_user_kind,
        "end_user_id": conversation.end_user_id,
    }
    created = {"generation_id": generation_id, "conversation_id": str(conversation.pk), "message_id": str(message.pk)}
    started_at = time.perf_counter()
    hit = _edge_exact_hit(job, conversation, earlier)
    pipe = get_redis().pipeline(transaction=True)
    persistence.queue_on(
        pipe,
        schema_name=schema_name,
        conversation_id=str(conversation.pk),
        records=[record_of(item) for item in messages],
        is_new_conversation=is_new_conversation,
    )
    outcome, _created_reply, _events = _queue_turn(
        pipe, job, owner=owner, created=created, hit=hit, started_at=started_at
    )
    pipe.execute()
    if outcome is not None:
        engine.record_metrics(job, outcome)
        if admission is not None:
            _settle_cached(job, outcome)
    return StartedTurn(
        generation_id=generation_id,
        conversation=conversation,
        user_message=message,
        stream_key=stream_key,
        headers=admission.headers if admission else {},
    )


def job_context(conversation: Conversation) -> dict:
    """What the worker needs of the conversation (TurnJob.context): it then runs the turn without SQL."""
    return {
        "bot_id": conversation.bot_id,
        "summary": conversation.summary,
        "summary_until_ts": conversation.summary_until_ts,
    }


# --- the response cache at the edge -------------------------------------------------------------


def _edge_exact_hit(job: TurnJob, conversation: Conversation, earlier: list[dict] | None) -> CachedAnswer | None:
    """An exact response-cache hit, looked up here rather than by a generation worker: the
    answer then costs one Redis GET and no hand-off. The key is the worker's own (the same
    inputs, chat.engine.inputs_for); a miss goes to the worker, which also tries the semantic
    layer. Only for bots whose answers are cacheable, so that others pay nothing for it."""
    bot = conversation.bot
    if not response_cache.is_cacheable({**bot.generation, **job.overrides}, cache_settings=bot.cache or {}):
        return None
    try:
        if earlier is None:
            earlier = engine.earlier_records(job, conversation, bot)
        inputs = engine.inputs_for(job, conversation, earlier)
        lookup = engine.cache_request(job, inputs)
        if lookup is None:
            return None
        return response_cache.exact_lookup(
            lookup.scope, exact=lookup.exact, cache_settings=inputs.cache, redis=get_redis()
        )
    except redis_exceptions.RedisError:
        logger.warning("edge_cache_lookup_failed", exc_info=True)  # the worker will try again
        return None


def _answer_from_cache(
    pipe, job: TurnJob, hit: CachedAnswer, started_at: float
) -> tuple[TurnOutcome, list[tuple[int, str, dict]]]:
    """Queue the cached answer's message and its events (the worker's own, chat.engine) on ``pipe``;
    returns its outcome and its events (where each one's entry id will be among the replies)."""
    outcome = engine.cached_outcome(hit, started_at)
    answer = engine.answer_record(job, outcome)
    outcome.message_id = answer["id"]
    persistence.queue_on(pipe, schema_name=job.schema_name, conversation_id=job.conversation_id, records=[answer])
    stream_key = generation_stream_key(job.schema_name, job.generation_id)
    events = [
        (STARTED_EVENT, {"cache": hit.layer}),
        *(("citation", citation) for citation in outcome.citations),
        ("token", {"text": outcome.text}),
        ("done", engine.done_event(outcome)),
    ]
    queued = []
    for event_type, data in events:
        queued.append((len(pipe), event_type, data))
        pipe.xadd(stream_key, {"type": event_type, "data": orjson.dumps(data)})
    return outcome, queued


def _settle_cached(job: TurnJob, outcome: TurnOutcome) -> None:
    """Bookkeeping must not fail an answer already given: a failure is logged (the reservation
    then expires on its own)."""
    try:
        gateway.settle_sync(job.gateway, **engine.settlement(job, outcome))
    except Exception:
        logger.exception("edge_cache_settle_failed", generation_id=job.generation_id)


def generation_get_for(*, generation_id: str, end_user: EndUser) -> str:
    """The stream key of a generation the caller may follow or cancel (NotFound otherwise)."""
    try:
        generation_id = str(uuid.UUID(generation_id))
    except ValueError:
        raise NotFound("No such generation.", param="id") from None
    schema_name = connection.schema_name
    raw = get_redis().get(generation_owner_key(schema_name, generation_id))
    if raw is None:
        raise NotFound("No such generation (or it expired).", param="id")
    owner = json.loads(raw)
    if not end_user.sees_all and (owner["end_user_kind"], owner["end_user_id"]) != (end_user.kind, end_user.id):
        raise NotFound("No such generation (or it expired).", param="id")
    return generation_stream_key(schema_name, generation_id)


def generation_cancel(*, generation_id: str, end_user: EndUser) -> None:
    generation_get_for(generation_id=generation_id, end_user=end_user)
    get_redis().set(cancel_key(connection.schema_name, str(uuid.UUID(generation_id))), 1, ex=STREAM_TTL_SECONDS)


# How long an SSE response's headers wait for the worker's cache decision (X-Parley-Cache). The
# first token comes after that decision anyway, so the wait costs a streaming client nothing;
# past it (workers backlogged) the response starts without the header.
CACHE_HEADER_WAIT_MS = 2_000


def turn_cache_layer(*, stream_key: str, timeout_ms: int = CACHE_HEADER_WAIT_MS) -> str | None:
    """``exact`` | ``semantic`` | ``miss`` once the generation worker has looked the turn up in the
    response cache; None if it has not within ``timeout_ms``."""
    if not connection.in_atomic_block:
        connection.close()  # no database work is left in the request: do not hold a connection
    redis = get_redis()
    last = "0-0"
    deadline = time.monotonic() + timeout_ms / 1000
    while (remaining := deadline - time.monotonic()) > 0:
        response = redis.xread({stream_key: last}, block=max(1, int(remaining * 1000)), count=64)
        for _key, entries in response or []:
            for entry_id, fields in entries:
                last = entry_id
                if fields[b"type"] == STARTED_EVENT.encode():
                    return json.loads(fields[b"data"])["cache"]
                if fields[b"type"] in (b"done", b"error"):
                    return None
    return None


def streamed_turn_headers(started: StartedTurn) -> dict[str, str]:
    """An SSE response's headers for a started turn: its generation id, the gateway's rate-limit
    headers, and ``X-Parley-Cache`` once the worker (or the edge) has decided."""
    headers = {"X-Parley-Generation-Id": started.generation_id, **started.headers}
    layer = turn_cache_layer(stream_key=started.stream_key)
    if layer is not None:
        headers["X-Parley-Cache"] = layer
    return headers


@dataclass(frozen=True, slots=True)
class WaitedTurn:
    message_id: str | None
    error: ParleyError | None
    text: str = ""
    done: dict | None = None  # the ``done`` event's data: usage, finish reason, provider, timings


_ERROR_STATUS = {"rate_limit_error": 429, "invalid_request_error": 400}
_CODE_STATUS = {"provider_timeout": 504, "provider_unavailable": 503}


def generation_error(data: dict) -> ParleyError:
    """A generation's ``error`` event as the error a waiting (non-streamed) caller answers with."""
    status = _CODE_STATUS.get(data.get("code"), _ERROR_STATUS.get(data.get("type"), 502))
    error = ParleyError(data["message"], code=data.get("code"), status_code=status)
    error.error_type = data.get("type", "api_error")
    return error


def turn_wait(*, stream_key: str, timeout_seconds: float = 600) -> WaitedTurn:
    """Block until the generation ends (for callers that did not ask for a stream), collecting
    the answer from its events.

    The database connection goes back to the pool first: a request waiting seconds for a model
    must not hold one (at a few hundred waiting clients the pool ran dry).
    """
    if not connection.in_atomic_block:
        connection.close()
    redis = get_redis()
    last = "0-0"
    parts: list[str] = []
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        response = redis.xread({stream_key: last}, block=5_000, count=512)
        for _key, entries in response or []:
            for entry_id, fields in entries:
                last = entry_id
                event_type = fields[b"type"]
                if event_type == b"token":
                    parts.append(json.loads(fields[b"data"])["text"])
                elif event_type == b"done":
                    data = json.loads(fields[b"data"])
                    return WaitedTurn(message_id=data["message_id"], error=None, text="".join(parts), done=data)
                elif event_type == b"error":
                    data = json.loads(fields[b"data"])
                    return WaitedTurn(
                        message_id=data.get("message_id"), error=generation_error(data), text="".join(parts)
                    )
    return WaitedTurn(
        message_id=None, error=ParleyError("The answer took too long.", code="generation_timeout", status_code=504)
    )
