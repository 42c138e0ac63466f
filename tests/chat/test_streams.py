"""The per-generation stream publisher: order kept, bursts merged, slow tokens not delayed."""

from __future__ import annotations

import asyncio
import json

import pytest

from chat.streams import CoalescingPublisher
from tenants.redis import get_async_redis
from tests.chat.turn_fixtures import hub_reads


async def _events(redis, key) -> list[tuple[str, dict]]:
    return [(fields[b"type"].decode(), json.loads(fields[b"data"])) for _id, fields in await redis.xrange(key)]


async def test_burst_of_tokens_is_merged_in_order():
    redis = get_async_redis()
    publisher = CoalescingPublisher(redis, "t:test:gen:burst", frame_seconds=0.05)

    for index in range(20):
        await publisher.add("token", {"text": f"w{index} "})
    await publisher.add("citation", {"index": 1})
    await publisher.add("token", {"text": "end"})
    await publisher.close("done", {"finish_reason": "stop"})

    events = await _events(redis, "t:test:gen:burst")
    types = [event_type for event_type, _data in events]
    text = "".join(data["text"] for event_type, data in events if event_type == "token")
    assert text == "".join(f"w{index} " for index in range(20)) + "end"
    assert types[0] == "token"
    assert events[0][1] == {"text": "w0 "}  # the first token is not held back
    assert types.count("token") <= 3
    assert types[-2:] == ["token", "done"]
    assert types.index("citation") < len(types) - 2
    assert 0 < await redis.ttl("t:test:gen:burst") <= 3600
    await redis.aclose()


async def test_a_buffered_publisher_writes_everything_once_with_the_terminal_event():
    """A non-streamed turn: nothing is written until the end, then every event in order in the
    caller's pipeline (one round trip with the answer and the settlement)."""
    redis = get_async_redis()
    key = "t:test:gen:buffered"
    publisher = CoalescingPublisher(redis, key, is_buffered=True)

    publisher.announce("generation.started", {"cache": "miss"})
    for index in range(5):
        await publisher.add("token", {"text": f"w{index} "})
    await asyncio.sleep(0.05)
    written_before_close = await redis.exists(key)
    async with redis.pipeline(transaction=False) as pipe:
        await publisher.close_on(pipe, "done", {"finish_reason": "stop"})
        await pipe.execute()

    events = await _events(redis, key)
    assert written_before_close == 0
    assert events == [
        ("generation.started", {"cache": "miss"}),
        ("token", {"text": "w0 w1 w2 w3 w4 "}),
        ("done", {"finish_reason": "stop"}),
    ]
    assert 0 < await redis.ttl(key) <= 3600
    await redis.aclose()


async def test_an_announcement_shares_the_first_tokens_write_when_it_comes_at_once():
    redis = get_async_redis()
    key = "t:test:gen:announce-fast"
    publisher = CoalescingPublisher(redis, key)

    publisher.announce("generation.started", {"cache": "miss"})
    await publisher.add("token", {"text": "first"})  # a fast model: within the grace

    assert publisher.writes == 1
    assert await _events(redis, key) == [("generation.started", {"cache": "miss"}), ("token", {"text": "first"})]
    await redis.aclose()


async def test_an_announcement_goes_alone_for_a_slow_model_and_delays_no_token():
    from chat.streams import ANNOUNCE_GRACE_SECONDS

    redis = get_async_redis()
    key = "t:test:gen:announce-slow"
    publisher = CoalescingPublisher(redis, key, frame_seconds=10)

    publisher.announce("generation.started", {"cache": "miss"})
    await asyncio.sleep(ANNOUNCE_GRACE_SECONDS + 0.05)  # the model has not answered yet
    announced = await _events(redis, key)
    await publisher.add("token", {"text": "first"})  # not held back by a frame (10 s here)

    assert announced == [("generation.started", {"cache": "miss"})]
    assert await _events(redis, key) == [("generation.started", {"cache": "miss"}), ("token", {"text": "first"})]
    await redis.aclose()


async def test_slow_tokens_are_not_delayed_or_merged():
    redis = get_async_redis()
    publisher = CoalescingPublisher(redis, "t:test:gen:slow", frame_seconds=0.01)

    for index in range(3):
        await publisher.add("token", {"text": str(index)})
        await asyncio.sleep(0.03)
    events_before_close = await _events(redis, "t:test:gen:slow")
    await publisher.close("done", {})

    assert events_before_close == [("token", {"text": "0"}), ("token", {"text": "1"}), ("token", {"text": "2"})]
    await redis.aclose()


async def test_pending_tokens_flush_without_a_next_event():
    redis = get_async_redis()
    publisher = CoalescingPublisher(redis, "t:test:gen:timer", frame_seconds=0.05)

    await publisher.add("token", {"text": "a"})
    await publisher.add("token", {"text": "b"})  # held: within the frame
    held = await _events(redis, "t:test:gen:timer")
    await asyncio.sleep(0.1)  # the provider stalls; the frame timer must flush "b" anyway
    flushed = await _events(redis, "t:test:gen:timer")

    assert held == [("token", {"text": "a"})]
    assert flushed == [("token", {"text": "a"}), ("token", {"text": "b"})]
    await redis.aclose()


# --- the per-process hub that follows streams for the transports --------------------------------


async def _follow_all(key: str) -> list:
    from chat.transports.hub import follow

    return [event async for event in follow(key, block_ms=5_000) if event is not None]


async def test_the_hub_follows_many_streams_over_one_connection():
    from chat.streams import publish
    from tenants.redis import get_loop_redis

    redis = get_loop_redis()
    before = len(await redis.client_list())
    keys = [f"t:test:gen:hub-{index}" for index in range(300)]
    followers = [asyncio.create_task(_follow_all(key)) for key in keys]
    await asyncio.sleep(0.2)  # all subscribed and waiting
    during = len(await redis.client_list())
    for round_number in range(3):
        for key in keys:
            await publish(redis, key, "token", {"text": f"{round_number} "})
    for key in keys:
        await publish(redis, key, "done", {"finish_reason": "stop"})
    received = await asyncio.wait_for(asyncio.gather(*followers), 10)

    assert during - before <= 3  # the hub's pub/sub connection and a command connection: not 300
    for events in received:
        assert [event.type for event in events] == ["token", "token", "token", "done"]
        assert "".join(event.data.get("text", "") for event in events) == "0 1 2 "


async def test_events_that_arrive_together_come_as_one_batch_then_each_as_it_comes():
    from chat.streams import publish
    from chat.transports.hub import follow_batches
    from tenants.redis import get_loop_redis

    redis = get_loop_redis()
    key = "t:test:gen:hub-batches"
    for text in ("a", "b", "c"):  # written before anyone follows: read in one XREAD
        await publish(redis, key, "token", {"text": text})
    batches = follow_batches(key, block_ms=5_000)
    first = await asyncio.wait_for(anext(batches), 2)
    await publish(redis, key, "token", {"text": "d"})
    second = await asyncio.wait_for(anext(batches), 2)
    await publish(redis, key, "done", {"finish_reason": "stop"})
    third = await asyncio.wait_for(anext(batches), 2)
    await batches.aclose()

    assert [event.data["text"] for event in first] == ["a", "b", "c"]
    assert [event.data["text"] for event in second] == ["d"]
    assert [event.type for event in third] == ["done"]


async def test_a_quiet_stream_yields_none_for_the_heartbeat():
    from chat.transports.hub import follow_batches

    batches = follow_batches("t:test:gen:hub-quiet", block_ms=50)
    assert await asyncio.wait_for(anext(batches), 2) is None
    await batches.aclose()


async def test_a_turn_registered_with_the_hub_is_followed_through_its_inbox_without_a_channel_of_its_own():
    from chat.streams import CoalescingPublisher, notify_channel
    from chat.transports.hub import follow_batches, get_hub
    from tenants.redis import get_loop_redis

    redis = get_loop_redis()
    hub = get_hub()
    key = "t:test:gen:hub-inbox"
    inbox = await hub.inbox_channel()
    subscription = hub.register(key)  # before anything is written, as the edge does
    publisher = CoalescingPublisher(redis, key, inbox=inbox)
    follower = asyncio.create_task(_collect(follow_batches(key, subscription=subscription, block_ms=5_000)))
    await publisher.add("token", {"text": "a"})
    await publisher.close("done", {"finish_reason": "stop"})
    events = await asyncio.wait_for(follower, 2)
    channel_subscribers = dict(await redis.pubsub_numsub(notify_channel(key), inbox))

    assert [event.type for event in events] == ["token", "done"]
    assert key not in hub.subscribers  # dropped when the follower ended
    assert channel_subscribers[notify_channel(key).encode()] == 0  # no SUBSCRIBE for this stream
    assert channel_subscribers[inbox.encode()] == 1
    await hub.unsubscribe(subscription)  # again: nothing happens


async def _collect(batches) -> list:
    return [event async for batch in batches if batch is not None for event in batch]


async def test_the_hub_catches_an_event_whose_notification_was_lost(monkeypatch):
    from chat.transports import hub
    from tenants.redis import get_loop_redis

    monkeypatch.setattr(hub, "SWEEP_SECONDS", 0.1)
    redis = get_loop_redis()
    key = "t:test:gen:hub-lost"
    follower = asyncio.create_task(_follow_all(key))
    await asyncio.sleep(0.2)
    # Written without the PUBLISH that normally follows (as if pub/sub dropped it).
    await redis.xadd(key, {"type": "done", "data": json.dumps({"finish_reason": "stop"})})

    events = await asyncio.wait_for(follower, 2)

    assert [event.type for event in events] == ["done"]


# --- events carried in the inbox's notifications ---------------------------------------------


async def test_an_inbox_notification_carries_the_events_it_announces():
    from chat.streams import CoalescingPublisher, events_of_notification

    redis = get_async_redis()
    key = "t:test:gen:carried"
    inbox = "parley:hub:test-carried"
    listener = redis.pubsub()
    await listener.subscribe(inbox)
    await listener.get_message(timeout=1)  # the subscription's confirmation
    first_id = await redis.xadd(key, {"type": "message.created", "data": "{}"})  # as the web writes it
    publisher = CoalescingPublisher(redis, key, inbox=inbox, inbox_events=True, frame_seconds=10)

    await publisher.add("token", {"text": 'line one\nline "two" \u2013 ünïcode'})
    await publisher.close("done", {"finish_reason": "stop"})
    notifications = [await listener.get_message(timeout=1) for _ in range(2)]
    await listener.aclose()

    stored = [
        (entry_id.decode(), fields[b"type"].decode(), json.loads(fields[b"data"]))
        for entry_id, fields in await redis.xrange(key)
    ]
    carried = [events_of_notification(message["data"].decode()) for message in notifications]
    assert carried[0][0] == key
    assert carried[0][1] == first_id.decode()
    assert carried[1][1] == stored[1][0]  # each names the entry before its events: no gap between
    assert [(event.id, event.type, event.data) for _key, _before, events in carried for event in events] == stored[1:]
    assert stored[1][2] == {"text": 'line one\nline "two" \u2013 ünïcode'}
    assert 0 < await redis.ttl(key) <= 3600
    await redis.aclose()


async def test_the_hub_takes_carried_events_without_reading_the_stream(monkeypatch):
    from chat.streams import CoalescingPublisher
    from chat.transports.hub import follow_batches, get_hub
    from tenants.redis import get_loop_redis

    redis = get_loop_redis()
    hub = get_hub()
    key = "t:test:gen:carried-hub"
    inbox = await hub.inbox_channel()
    subscription = hub.register(key)
    created = await redis.xadd(key, {"type": "message.created", "data": "{}"})
    hub.advance(subscription, created.decode())  # the edge wrote it: it needs no read
    reads = hub_reads(hub, monkeypatch)
    publisher = CoalescingPublisher(redis, key, inbox=inbox, inbox_events=True)
    follower = asyncio.create_task(_collect(follow_batches(key, subscription=subscription, block_ms=5_000)))
    await publisher.add("token", {"text": "a"})
    await asyncio.sleep(0.05)
    await publisher.add("token", {"text": "b"})
    await publisher.close("done", {"finish_reason": "stop"})
    events = await asyncio.wait_for(follower, 2)

    assert [event.type for event in events] == ["token", "token", "done"]
    assert "".join(event.data.get("text", "") for event in events) == "ab"
    assert [event.id for event in events] == [entry_id.decode() for entry_id, _fields in (await redis.xrange(key))[1:]]
    assert reads == []


async def test_a_follower_missing_events_before_a_carried_batch_gets_the_stream_read():
    from chat.streams import CoalescingPublisher
    from chat.transports.hub import follow_batches, get_hub
    from tenants.redis import get_loop_redis

    redis = get_loop_redis()
    hub = get_hub()
    key = "t:test:gen:carried-gap"
    inbox = await hub.inbox_channel()
    subscription = hub.register(key)  # not advanced: it must see message.created too
    await redis.xadd(key, {"type": "message.created", "data": "{}"})
    # An event whose notification this process never got (written elsewhere, or lost).
    await redis.xadd(key, {"type": "generation.started", "data": json.dumps({"cache": "miss"})})
    publisher = CoalescingPublisher(redis, key, inbox=inbox, inbox_events=True)
    follower = asyncio.create_task(_collect(follow_batches(key, subscription=subscription, block_ms=5_000)))
    await publisher.close("done", {"finish_reason": "stop"})
    events = await asyncio.wait_for(follower, 2)

    assert [event.type for event in events] == ["message.created", "generation.started", "done"]
    assert len({event.id for event in events}) == 3  # none twice


# --- a stream's last write failing -----------------------------------------------------------


async def test_a_closing_batch_whose_write_was_refused_whole_is_written_again():
    redis = get_async_redis()
    key = "t:test:gen:close-refused"
    publisher = CoalescingPublisher(redis, key, frame_seconds=10)
    await publisher.add("token", {"text": "a"})
    await publisher.add("token", {"text": "b"})  # pending: goes with the end

    async with redis.pipeline(transaction=False) as pipe:
        pipe.set("t:test:other-end-of-turn-write", 1)
        closing = await publisher.close_on(pipe, "done", {"finish_reason": "stop"})
        # Not executed: as if Redis had refused every command of the events.
        results = [True] + [RuntimeError("OOM command not allowed")] * (len(pipe) - 1)
        pipe.reset()
    await closing.finish(results)

    assert await _events(redis, key) == [
        ("token", {"text": "a"}),
        ("token", {"text": "b"}),
        ("done", {"finish_reason": "stop"}),
    ]
    await redis.aclose()


async def test_a_closing_batch_written_in_part_ends_the_stream_with_an_error_not_a_repeat():
    redis = get_async_redis()
    key = "t:test:gen:close-partial"
    publisher = CoalescingPublisher(redis, key, frame_seconds=10)
    await publisher.add("token", {"text": "a"})
    await publisher.add("citation", {"index": 1})  # pending: goes with the end

    async with redis.pipeline(transaction=False) as pipe:
        closing = await publisher.close_on(pipe, "done", {"finish_reason": "stop"})
        results = await pipe.execute()
    results[closing.replies.start + 1] = RuntimeError("refused")  # say the terminal event failed
    await closing.finish(results)

    events = await _events(redis, key)
    assert [event_type for event_type, _data in events][:3] == ["token", "citation", "done"]
    assert events[-1][0] == "error"
    assert events[-1][1]["code"] == "generation_interrupted"
    assert [event_type for event_type, _data in events].count("token") == 1  # nothing repeated
    await redis.aclose()


@pytest.mark.parametrize("resume_from", ["final", "past_final"], ids=["at_the_final_event_case", "past_it_case"])
async def test_a_resumed_stream_that_has_already_ended_closes_at_once(resume_from):
    """Before: ``Last-Event-ID`` at or past the final event got keep-alives forever (a browser's
    EventSource reconnects after every close, so each such client held a connection for ever)."""
    from chat.transports.hub import follow

    redis = get_async_redis()
    key = "t:test:gen:ended"
    await redis.xadd(key, {"type": "message.created", "data": "{}"})
    await redis.xadd(key, {"type": "token", "data": json.dumps({"text": "Hello"})})
    final_id = (await redis.xadd(key, {"type": "done", "data": json.dumps({"finish_reason": "stop"})})).decode()
    milliseconds, sequence = final_id.split("-")
    after = final_id if resume_from == "final" else f"{milliseconds}-{int(sequence) + 5}"

    async with asyncio.timeout(5):
        events = [event async for event in follow(key, after=after, block_ms=100)]

    assert [(event.id, event.type) for event in events] == [(final_id, "done")]


async def test_a_resume_before_the_end_still_gets_the_rest():
    from chat.transports.hub import follow

    redis = get_async_redis()
    key = "t:test:gen:resumed"
    await redis.xadd(key, {"type": "message.created", "data": "{}"})
    token_id = (await redis.xadd(key, {"type": "token", "data": json.dumps({"text": "Hello"})})).decode()
    await redis.xadd(key, {"type": "token", "data": json.dumps({"text": " world"})})
    await redis.xadd(key, {"type": "done", "data": json.dumps({"finish_reason": "stop"})})

    events = [event async for event in follow(key, after=token_id, block_ms=100)]

    assert [event.type for event in events] == ["token", "done"]
    assert events[0].data == {"text": " world"}
