"""Waking a run: enqueue its task, or nudge the worker that holds it.

A wake-up (a timer came due, a signal arrived) that finds the run's task pending costs nothing:
the pending task will run. One that finds the task in flight cannot be enqueued (NATS.md §8),
so the holder named by the run's lease is told on ``natflow.worker.<identity>.wake``; and a
holder that releases the run re-checks for due timers and new signals after it acknowledges.
"""

from __future__ import annotations

import logging

from ._connection import Connection
from ._history import CorruptHistory
from ._leases import Leases
from ._level_read import first_start
from ._tasks import Task, enqueue
from ._undecodable import UNDECODABLE
from .events import RunStarted, decode_event

log = logging.getLogger("natflow.wake")


def wake_subject(identity: str) -> str:
    return f"natflow.worker.{identity}.wake"


async def run_start(conn: Connection, run_id: str) -> RunStarted | None:
    """The run's ``run_started`` event, its first (one direct get), or None if there is none.

    :class:`CorruptHistory` if that event does not decode."""
    msg = await first_start(conn, run_id)
    if msg is None:
        return None
    headers = msg.headers or {}
    try:
        event = decode_event(msg.data)
    except UNDECODABLE as exc:
        seq = int(headers.get("Nats-Sequence", "0"))
        raise CorruptHistory(run_id, seq, str(exc), last_seq=0, count=0, last=None) from None
    return event if isinstance(event, RunStarted) else None


async def wake(conn: Connection, start: RunStarted, run_id: str, reason: str) -> None:
    task = Task(run_id=run_id, workflow=start.workflow, reason=reason)
    if await enqueue(conn, start.queue, task):
        return
    found = await Leases(conn).get(run_id)
    if found is not None:
        await conn.send(wake_subject(found[0].worker), run_id.encode())
