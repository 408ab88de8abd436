"""Taking turns at a KV cell that many writers change by revision-checked puts.

A rate limit's cell, a singleton's and a debounce window's are read and written back with
the revision read: when two writers race, one loses and reads again. Writers in one process
lose to each other for nothing: a ``ctx.parallel`` of 80 rate-limited steps, or 30 starts of
one debounced workflow at once, lost 20 to 50 rounds in a row and failed. So a process takes
its turns at a cell one at a time (:func:`one_at_a_time`; its cached revision then makes a
take one round trip), and a writer that loses to another process waits a short, growing,
random while before it reads again (:func:`after_conflict`), rather than at once in step.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio

from ._connection import Connection

_TURNS: Final = "natflow_cell_turns"
_MAX_PAUSE: Final = 0.05  # seconds: the longest wait after a conflict


@asynccontextmanager
async def one_at_a_time(conn: Connection, cell: str) -> AsyncIterator[None]:
    """Hold this process's turn at ``cell`` (a lock kept only while someone wants it)."""
    turns = conn.extras.setdefault(_TURNS, {})
    assert isinstance(turns, dict)
    entry = turns.get(cell)
    if entry is None:
        entry = turns[cell] = [anyio.Lock(), 0]
    entry[1] += 1
    try:
        async with entry[0]:
            yield
    finally:
        entry[1] -= 1
        if entry[1] == 0:
            del turns[cell]


async def after_conflict(attempt: int) -> None:
    """Wait before attempt ``attempt + 1`` at a cell another process just wrote."""
    await anyio.sleep(random.uniform(0, min(_MAX_PAUSE, 0.001 * 2**attempt)))
