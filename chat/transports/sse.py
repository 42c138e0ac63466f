"""Server-Sent Events over a generation's Redis stream.

Each event carries the stream entry id as its SSE ``id``; a reconnecting client sends it back as
``Last-Event-ID`` and continues after it, on any replica. A comment line every 15 seconds keeps
proxies from closing an idle stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from django.db import connection
from django.http import StreamingHttpResponse

from chat.metrics import ACTIVE_STREAMS
from chat.streams import StreamEvent
from chat.transports.hub import follow_batches

HEARTBEAT_MS = 15_000
# Every event stream's headers (Django's responses and the ASGI edge's alike).
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
HEARTBEAT = b": keep-alive\n\n"
RECONNECT_MS = 2_000


def format_event(event: StreamEvent) -> bytes:
    data = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.id}\nevent: {event.type}\ndata: {data}\n\n".encode()


async def event_stream(stream_key: str, *, after: str = "0-0") -> AsyncIterator[bytes]:
    ACTIVE_STREAMS.labels("sse").inc()
    try:
        yield f"retry: {RECONNECT_MS}\n\n".encode()
        async for batch in follow_batches(stream_key, after=after, block_ms=HEARTBEAT_MS):
            yield HEARTBEAT if batch is None else b"".join(map(format_event, batch))
    finally:
        ACTIVE_STREAMS.labels("sse").dec()


def sse_response(body: AsyncIterator[bytes], *, headers: dict[str, str] | None = None) -> StreamingHttpResponse:
    """The stream needs no database: its connection goes back to the pool now, not when the
    stream ends (Django releases it at request_finished) — 9,000 open streams held every pooled
    connection and the next requests failed waiting for one."""
    if not connection.in_atomic_block:
        connection.close()
    response = StreamingHttpResponse(body, content_type=SSE_HEADERS["Content-Type"])
    for name, value in {**SSE_HEADERS, **(headers or {})}.items():
        response[name] = value
    return response


def wants_event_stream(request) -> bool:
    return "text/event-stream" in request.META.get("HTTP_ACCEPT", "")
