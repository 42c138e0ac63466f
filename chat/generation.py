"""Generation workers: an asyncio pool consuming turn jobs from a Redis Stream.

Web processes only enqueue a turn (``chat.turns.turn_start``) and relay its events; the turn runs
here, so a web replica that dies mid-answer does not stop the answer, and generation capacity
scales on its own (``manage.py run_generators``, as many processes as needed: a consumer group
shares the jobs out). One process runs hundreds of turns at once — they mostly wait on the model.

Jobs are acknowledged when their turn ends. A job whose worker died stays pending and is
claimed by another worker after ``claim_idle_ms``: if its generation had not started it runs
now; if tokens had already been streamed it is ended with an error event (answers are never
silently regenerated) and the partial answer is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import StreamIdT

from chat.engine import TurnOutcome, run_turn, save_answer
from chat.metrics import ACTIVE_GENERATIONS, GENERATION_STORE_ERRORS
from chat.providers.base import Provider
from chat.streams import INTERRUPTED_ERROR, JOBS_GROUP, JOBS_STREAM, generation_stream_key, publish
from chat.turn_job import TurnJob
from tenants.redis import REDIS_UNAVAILABLE, get_async_redis

logger = logging.getLogger(__name__)

STORE_BACKOFF_FIRST_SECONDS = 0.1
STORE_BACKOFF_MAX_SECONDS = 5.0


def default_route_factory() -> Callable[[dict], Provider]:
    from chat.providers.registry import build_route

    return build_route


class GenerationWorker:
    def __init__(
        self,
        *,
        redis: aioredis.Redis | None = None,
        concurrency: int = 256,
        consumer: str | None = None,
        claim_idle_ms: int = 60_000,
        route_for: Callable[[dict], Provider] | None = None,
    ) -> None:
        self.redis = redis or get_async_redis()
        self.concurrency = concurrency
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.route_for = route_for or default_route_factory()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: dict[asyncio.Task, bytes | str] = {}  # running jobs' stream entry ids

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(JOBS_STREAM, JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Take jobs until ``stop``; a Redis outage (a restart, a failover) is ridden out — logged,
        counted, retried with backoff — rather than ending the process."""
        backoff = 0.0
        while not stop.is_set():
            try:
                await self._take_jobs(stop)
            except (*REDIS_UNAVAILABLE, ResponseError) as error:
                if isinstance(error, ResponseError) and "NOGROUP" not in str(error):
                    raise  # only a group lost with a Redis that restarted empty is recoverable here
                backoff = min(STORE_BACKOFF_MAX_SECONDS, max(STORE_BACKOFF_FIRST_SECONDS, backoff * 2))
                GENERATION_STORE_ERRORS.inc()
                logger.warning("generation worker: Redis unavailable (%s); retrying in %.1f s", error, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
            else:
                backoff = 0.0
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        from chat.providers.registry import routes_close

        await routes_close()  # connection pools and pool scrapers of this loop

    async def _take_jobs(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        next_claim = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if loop.time() >= next_claim:
                await self._heartbeat()
                await self._claim_orphans()
                next_claim = loop.time() + max(self.claim_idle_ms / 4000, 0.1)
            free = self.concurrency - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED, timeout=self.claim_idle_ms / 4000)
                continue
            # Never block past a heartbeat: running jobs' idle time must reset before it reaches claim_idle_ms.
            block = max(10, min(500, self.claim_idle_ms // 4))
            response = await self.redis.xreadgroup(
                JOBS_GROUP, self.consumer, {JOBS_STREAM: ">"}, count=free, block=block
            )
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    self._spawn(entry_id, fields, orphan=False)

    def _spawn(self, entry_id, fields, *, orphan: bool) -> None:
        task = asyncio.create_task(self._handle(entry_id, fields, orphan=orphan))
        self._tasks.add(task)
        self._in_flight[task] = entry_id
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda done: self._in_flight.pop(done, None))

    async def _heartbeat(self) -> None:
        """Reset the idle time of the jobs this worker is running: an answer that streams for
        longer than ``claim_idle_ms`` must not look abandoned to the other workers (which would
        take it over and end it as interrupted)."""
        entry_ids: list[StreamIdT] = list(self._in_flight.values())
        if entry_ids:
            await self.redis.xclaim(JOBS_STREAM, JOBS_GROUP, self.consumer, 0, entry_ids, justid=True)

    async def _handle(self, entry_id, fields, *, orphan: bool) -> None:
        try:
            job = TurnJob.from_wire(orjson.loads(fields[b"job"]))
        except (KeyError, TypeError, ValueError):
            logger.exception("dropping malformed generation job %s", entry_id)
            await self._ack(entry_id)
            return
        ACTIVE_GENERATIONS.inc()
        is_acknowledged = False
        try:
            if orphan and await self._recover(job):
                return
            outcome = await run_turn(
                job, redis=self.redis, route_for=self.route_for, on_finish=lambda pipe: self._ack_on(pipe, entry_id)
            )
            is_acknowledged = outcome.is_finished_in_one_trip
        except Exception:
            logger.exception("generation %s failed", job.generation_id)
            await publish(
                self.redis,
                generation_stream_key(job.schema_name, job.generation_id),
                "error",
                {
                    "message": "The answer could not be generated; please try again.",
                    "type": "server_error",
                    "code": "generation_failed",
                },
                inbox=job.inbox,
            )
        finally:
            ACTIVE_GENERATIONS.dec()
            if not is_acknowledged:
                await self._ack(entry_id)

    async def _ack(self, entry_id) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            self._ack_on(pipe, entry_id)
            await pipe.execute()

    @staticmethod
    def _ack_on(pipe, entry_id) -> None:
        """The job is done: off the consumer group's pending list and out of the stream (with the
        turn's last writes, in the same round trip, when the turn ends normally)."""
        pipe.xack(JOBS_STREAM, JOBS_GROUP, entry_id)
        pipe.xdel(JOBS_STREAM, entry_id)

    async def _claim_orphans(self) -> None:
        _next, claimed, _deleted = await self.redis.xautoclaim(
            JOBS_STREAM, JOBS_GROUP, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=50
        )
        for entry_id, fields in claimed:
            if fields:
                self._spawn(entry_id, fields, orphan=True)

    async def _recover(self, job: TurnJob) -> bool:
        """Handle a job whose worker died. True when nothing is left to run."""
        key = generation_stream_key(job.schema_name, job.generation_id)
        events = await self.redis.xrange(key)
        types = [fields[b"type"].decode() for _id, fields in events]
        if "done" in types or "error" in types:
            return True
        if "token" not in types:
            return False  # never started: run it now
        text = "".join(json.loads(fields[b"data"])["text"] for _id, fields in events if fields[b"type"] == b"token")
        outcome = TurnOutcome(text=text, finish_reason="error")
        message_id = await save_answer(job, outcome, self.redis)
        await publish(
            self.redis,
            key,
            "error",
            {**INTERRUPTED_ERROR, "message_id": message_id, "partial_text_length": len(text)},
            inbox=job.inbox,
        )
        return True
