"""Writing a batch of rows that PostgreSQL may refuse in part: the good rows commit, the refused
ones are set aside with their error, and nothing good waits behind a bad row.

The batch writers (chat.memory.persistence's messages, billing.metering's usage) read a batch
from a Redis stream and write it in one transaction. A row PostgreSQL refuses for its data (a
NUL byte, a value out of range, a broken constraint) fails the whole transaction — and a retry of
the same batch fails the same way, forever, while new rows of every tenant join it. So a refused
batch is written again row by row; the rows refused alone go to the writer's dead-letter stream.
A database that is down (an ``OperationalError``) is not a refusal: the batch stays pending for
the next flush.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from django.db import DataError, IntegrityError

Item = TypeVar("Item")

REFUSED_BY_DATA = (DataError, IntegrityError)


@dataclass(frozen=True, slots=True)
class Refused(Generic[Item]):
    item: Item
    error: str


def write_isolating(
    items: Sequence[Item],
    write: Callable[[Sequence[Item]], int],
    *,
    before_one_by_one: Callable[[Sequence[Item]], None] | None = None,
) -> tuple[int, list[Refused[Item]]]:
    """``write(items)`` in one transaction; when PostgreSQL refuses the batch's data, each item in
    a transaction of its own. Returns the rows written and the items refused alone (in order).
    ``write`` must be idempotent (the writers skip rows already stored). ``before_one_by_one``:
    what the items need in place before they are written alone (the rows they refer to)."""
    try:
        return write(items), []
    except REFUSED_BY_DATA as error:
        if len(items) == 1:
            return 0, [Refused(items[0], _reason(error))]
    if before_one_by_one is not None:
        before_one_by_one(items)
    written = 0
    refused: list[Refused[Item]] = []
    for item in items:
        try:
            written += write([item])
        except REFUSED_BY_DATA as error:
            refused.append(Refused(item, _reason(error)))
    return written, refused


def _reason(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:500]
