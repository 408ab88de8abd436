"""Waking a run: enqueue its task, and nudge the worker that holds it.

A wake-up (a timer came due, a signal arrived) enqueues the run's task (one that finds the
task pending costs nothing: the pending task will run; one that finds it in flight cannot be
enqueued, NATS.md §8), and tells the holder named by the run's lease, if any, on
``natflow.worker.<identity>.wake``; a holder that releases the run re-checks for due timers
and new signals after it acknowledges.
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
    """Make sure the run looks at what woke it: a task, and a nudge of its holder if a
    worker holds it. Enqueued or not: a new run is held without a task (a worker took its
    start from history), and a task for a held run may reach another worker, which leaves
    it (held elsewhere) while the holder went on unaware of a cancel until the run's end."""
    task = Task(run_id=run_id, workflow=start.workflow, reason=reason)
    await enqueue(conn, start.queue, task)
    found = await Leases(conn).get(run_id)
    if found is not None:
        await conn.send(wake_subject(found[0].worker), run_id.encode())
