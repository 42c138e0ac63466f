"""The contract between the web processes that start turns and the generation workers that run
them: a ``TurnJob`` on the jobs stream (chat.streams.JOBS_STREAM), with its ``TurnContext``.

Each crosses the process boundary through its ``to_wire``/``from_wire`` only. The wire shape is
the one workers and web processes of the previous release read and write (the delivery details
inside ``context``, ``is_streamed`` at the top), so either side can be upgraded first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What the worker would otherwise query the conversation for: with it (and the bot's
    snapshot, chat.snapshots) a turn needs no SQL."""

    bot_id: int
    summary: str = ""
    summary_until_ts: int = 0  # microseconds since the epoch (chat.memory.records)
    # A stateless exchange (the OpenAI API) carries its earlier messages and the configuration
    # epoch it was admitted under: the worker then calls the model without a round trip.
    epoch: str | None = None
    earlier: list[dict[str, Any]] | None = None
    # Delivery: the starting web process's notification channel (chat.transports.hub), and
    # whether that process takes the events inside the notifications.
    inbox: str | None = None
    inbox_events: bool = False

    @property
    def is_carried(self) -> bool:
        """Whether the job carries its history and epoch (no hot-store read needed)."""
        return self.earlier is not None and self.epoch is not None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "bot_id": self.bot_id,
            "summary": self.summary,
            "summary_until_ts": self.summary_until_ts,
        }
        if self.epoch is not None:
            wire["epoch"] = self.epoch
        if self.earlier is not None:
            wire["earlier"] = self.earlier
        if self.inbox is not None:
            wire["inbox"] = self.inbox
            wire["inbox_events"] = self.inbox_events
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any] | None) -> TurnContext | None:
        if wire is None:
            # Jobs from before contexts existed: the worker reads the conversation from PostgreSQL.
            # This branch can go once no web process older than the context (Nov 2026) runs.
            return None
        return cls(
            bot_id=int(wire["bot_id"]),
            summary=wire.get("summary") or "",
            summary_until_ts=int(wire.get("summary_until_ts") or 0),
            epoch=wire.get("epoch"),
            earlier=wire.get("earlier"),
            inbox=wire.get("inbox"),
            # A web process from before carried events names no "inbox_events": it takes the key alone.
            inbox_events=bool(wire.get("inbox_events")),
        )


@dataclass(frozen=True, slots=True)
class TurnJob:
    """What a generation worker needs to run one turn."""

    schema_name: str
    generation_id: str
    conversation_id: str
    user_message_id: str
    # The user's message travels with the job: it may not be in PostgreSQL yet (batched persistence).
    user_content: str = ""
    user_message_ts: int = 0  # microseconds since the epoch (chat.memory.records)
    # Per-request generation parameters (the OpenAI API's temperature, max_tokens, …), validated.
    overrides: dict[str, Any] = field(default_factory=dict)
    is_streamed: bool = True  # the client watches tokens arrive (SSE, WebSocket, stream=true)
    # The admission's ticket (chat.admission): budget reservation, limits to charge, metering ids.
    gateway: dict[str, Any] | None = None
    context: TurnContext | None = None

    @property
    def inbox(self) -> str | None:
        """The notification channel of the web process that started the turn, if it has one."""
        return self.context.inbox if self.context is not None else None

    @property
    def inbox_events(self) -> bool:
        return self.context.inbox_events if self.context is not None else False

    def to_wire(self) -> dict[str, Any]:
        return {
            "schema_name": self.schema_name,
            "generation_id": self.generation_id,
            "conversation_id": self.conversation_id,
            "user_message_id": self.user_message_id,
            "user_content": self.user_content,
            "user_message_ts": self.user_message_ts,
            "overrides": self.overrides,
            "is_streamed": self.is_streamed,
            "gateway": self.gateway,
            "context": self.context.to_wire() if self.context is not None else None,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> TurnJob:
        return cls(
            schema_name=wire["schema_name"],
            generation_id=wire["generation_id"],
            conversation_id=wire["conversation_id"],
            user_message_id=wire["user_message_id"],
            user_content=wire.get("user_content") or "",
            user_message_ts=int(wire.get("user_message_ts") or 0),
            overrides=wire.get("overrides") or {},
            is_streamed=bool(wire.get("is_streamed", True)),
            gateway=wire.get("gateway"),
            context=TurnContext.from_wire(wire.get("context")),
        )
