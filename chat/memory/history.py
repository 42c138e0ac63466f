"""History strategies: which earlier messages of a conversation the model sees.

- ``full``: every earlier message, newest kept first when the context window cannot hold them all;
- ``window``: the last ``history_window`` turns;
- ``summary``: a running summary of older turns (written by a Celery task with a provider call,
  chat.memory.summaries) followed by the turns it does not cover yet, at most ``history_window``.

Each strategy then fits its messages into the room the context window leaves, dropping the oldest
first (a turn at a time, so that an answer never appears without its question).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chat.memory.tokens import estimate_tokens, message_tokens

DEFAULT_CONTEXT_TOKENS = 8_192
DEFAULT_MAX_TOKENS = 512
# Kept free for what estimates miss (chat templates, tool markup).
SAFETY_MARGIN_TOKENS = 64
SUMMARY_PREFIX = "Summary of the earlier conversation (for context; the user does not see it):\n"


@dataclass(frozen=True, slots=True)
class History:
    messages: list[dict[str, str]]  # role/content, oldest first, what the model sees
    tokens: int  # their estimated tokens
    dropped: int  # earlier messages the strategy chose but the context window could not hold
    needs_summary: bool = False  # the summary strategy has more unsummarised turns than it shows


def history_budget(*, context_tokens: int, max_tokens: int | None, prompt_text: str, user_text: str) -> int:
    """Tokens left for history once the system prompt (with sources), the new message and the
    answer's room are counted."""
    fixed = estimate_tokens(prompt_text) + estimate_tokens(user_text) + 2 * 4 + SAFETY_MARGIN_TOKENS
    return max(0, context_tokens - (max_tokens or DEFAULT_MAX_TOKENS) - fixed)


def _fit(records: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], int]:
    """The newest records that fit in ``budget``, oldest first; never starting with an answer."""
    kept: list[dict[str, Any]] = []
    used = 0
    for record in reversed(records):
        cost = message_tokens(record)
        if used + cost > budget:
            break
        kept.append(record)
        used += cost
    kept.reverse()
    while kept and kept[0]["role"] == "assistant":  # its question did not fit: drop it too
        used -= message_tokens(kept.pop(0))
    return kept, used


def build_history(
    *,
    strategy: str,
    records: list[dict[str, Any]],
    window_turns: int,
    budget: int,
    summary: str = "",
    summary_until_ts: int = 0,
) -> History:
    """``records``: the earlier messages available (oldest first; all of them for ``full``)."""
    usable = [record for record in records if record.get("content") and record.get("role") in ("user", "assistant")]
    window = max(1, window_turns) * 2
    prefix: list[dict[str, str]] = []
    needs_summary = False
    if strategy == "full":
        chosen = usable
    elif strategy == "summary":
        unsummarised = [record for record in usable if record["ts"] > summary_until_ts]
        chosen = unsummarised[-window:]
        needs_summary = len(unsummarised) > window
        if summary:
            prefix = [{"role": "system", "content": SUMMARY_PREFIX + summary}]
    else:  # window
        chosen = usable[-window:]
    prefix_tokens = sum(estimate_tokens(item["content"]) + 4 for item in prefix)
    if prefix_tokens > budget:  # a summary too long for this model's window is dropped, not cut
        prefix, prefix_tokens = [], 0
    kept, used = _fit(chosen, budget - prefix_tokens)
    return History(
        messages=prefix + [{"role": record["role"], "content": record["content"]} for record in kept],
        tokens=used + prefix_tokens,
        dropped=len(chosen) - len(kept),
        needs_summary=needs_summary,
    )
