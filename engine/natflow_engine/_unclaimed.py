"""Closing a run that no worker has taken yet, on a cancel or terminate request.

A cancel or terminate is applied by the worker that drives the run (it moves the request
into history and stops the workflow). A run that no worker has taken has no such worker: one
of a workflow nobody serves (a typo, a workflow removed), one whose start is delayed, one
waiting for a concurrency slot. The request waited for a worker that might never come: the
run could not be closed, so not deleted either. So the engine's signal intake closes such a
run itself: where the run's history is its start alone, it appends ``run_cancelled`` or
``run_terminated`` after it, fenced by the start's sequence. A worker taking the run at that
moment is fenced out (its claim fails, it reads the run closed), or fences the engine out
(then the worker applies the request, as it always did).
"""

from __future__ import annotations

import logging

from ._connection import Connection
from ._history import AppendConflict, HistoryStore
from .events import RunCancelled, RunContinued, RunStarted, RunTerminated, utcnow

log = logging.getLogger("natflow.signals")


async def close_unclaimed(
    conn: Connection, run_id: str, *, terminate: bool, reason: str | None
) -> bool:
    """Close the run, cancelled or (``terminate``) terminated, if its history is its start
    alone; True if this closed it."""
    store = HistoryStore(conn)
    found = await store.last(run_id)
    if found is None:
        return False
    start, seq = found
    if (
        not isinstance(start, RunStarted)
        or isinstance(start, RunContinued)  # a later stretch: its events are numbered on
        or start.restarted_from is not None  # a restart's copied history follows its start
        or start.id != f"{run_id}:1"
    ):
        return False
    at = utcnow()
    end: RunCancelled | RunTerminated = (
        RunTerminated(id=f"{run_id}:2", at=at, reason=reason)
        if terminate
        else RunCancelled(id=f"{run_id}:2", at=at, reason=reason)
    )
    try:
        await store.append(run_id, end, seq)
    except AppendConflict:  # a worker took the run meanwhile: it applies the request
        return False
    log.info("run %s %s before any worker took it", run_id, str(end.__struct_config__.tag)[4:])
    return True
