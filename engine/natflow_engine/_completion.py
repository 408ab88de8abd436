"""What the engine does when a run changes status: lifecycle events, ``on_complete`` runs,
and the first task of a restarted run.

The dispatcher calls :meth:`RunHooks.status_changed` before it writes a run's new summary to
the index, and :meth:`RunHooks.event_folded` for every run-level event it processed, before
it acknowledges it. Both are idempotent, because an engine may die after doing them and
before acknowledging: the lifecycle message id and the ``on_complete`` run id are derived
from the run, so the redelivered event publishes and starts nothing twice.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Final

import msgspec

from ._connection import Connection
from ._errors import ErrorInfo
from ._flow_decls import start_declared
from ._history import HistoryStore
from ._lifecycle import publish_status
from ._names import derived_run_id
from ._runs import Runs
from ._state import RunInfo
from ._tasks import Task, enqueue
from ._value_release import release_older_stretches
from ._values import is_ref, load_value
from ._wake import run_start
from .events import (
    Event,
    RestartSeeded,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    RunTerminated,
)

log = logging.getLogger("natflow.engine")

_SUFFIX = "-oncomplete"
_KNOWN_STARTS: Final = 50_000  # runs whose on_complete target this engine saw start


class RunOutcome(msgspec.Struct, kw_only=True, frozen=True):
    """How a run closed: the input of the workflow its ``on_complete`` names.

    ``status`` is ``completed``, ``failed``, ``cancelled`` or ``terminated``; ``result`` is
    the run's result when it completed, ``error`` what failed or stopped it otherwise.
    """

    run_id: str
    workflow: str
    status: str
    result: Any = None
    error: ErrorInfo | None = None


_encoder = msgspec.json.Encoder()


def on_complete_run_id(run_id: str) -> str:
    """The id of the run that ``on_complete`` starts for ``run_id``: derived, so a second
    engine, or the same one after a crash, starts the same run (which then exists)."""
    return derived_run_id(run_id, _SUFFIX)


def outcome_of(run_id: str, workflow: str, event: Event) -> RunOutcome | None:
    """The outcome a closing event records (None for any other event)."""
    if isinstance(event, RunCompleted):
        result = msgspec.json.decode(event.result)
        return RunOutcome(run_id=run_id, workflow=workflow, status="completed", result=result)
    if isinstance(event, RunFailed):
        return RunOutcome(run_id=run_id, workflow=workflow, status="failed", error=event.error)
    if isinstance(event, RunCancelled | RunTerminated):
        status = "cancelled" if isinstance(event, RunCancelled) else "terminated"
        kind = "RunCancelled" if isinstance(event, RunCancelled) else "RunTerminated"
        error = ErrorInfo(type=kind, message=event.reason or status)  # as describe() says
        return RunOutcome(run_id=run_id, workflow=workflow, status=status, error=error)
    return None


class RunHooks:
    """The dispatcher's hooks; see the module docstring."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._runs = Runs(conn)
        self._history = HistoryStore(conn)
        self.on_complete_started = 0
        # run id -> (workflow, on_complete, its queue) from the run_started this engine folded:
        # saves reading the start again when the run closes (most runs have no hook).
        self._starts: OrderedDict[str, tuple[str, str | None, str]] = OrderedDict()

    async def status_changed(self, previous: str | None, info: RunInfo, hseq: int) -> None:
        await publish_status(self._conn, previous, info, hseq)

    async def event_folded(self, run_id: str, event: Event, *, hooked: bool = True) -> None:
        """``hooked``: False when the run index says the run's start names no
        ``on_complete`` workflow (so a replica that did not fold the start need not read it)."""
        if isinstance(event, RunContinued):  # the older stretches' values are free now
            self._remember(run_id, event)
            released = await release_older_stretches(self._conn, run_id)
            if released:
                log.debug("run %s: %d values of older stretches deleted", run_id, released)
        elif isinstance(event, RunStarted):
            self._remember(run_id, event)
        elif isinstance(event, RestartSeeded):
            await self._start_restarted(run_id)
        else:
            await self._on_complete(run_id, event, hooked)

    def _remember(self, run_id: str, start: RunStarted) -> None:
        queue = start.on_complete_queue or "default"
        self._starts[run_id] = (start.workflow, start.on_complete, queue)
        self._starts.move_to_end(run_id)
        while len(self._starts) > _KNOWN_STARTS:
            self._starts.popitem(last=False)

    async def _on_complete(self, run_id: str, event: Event, hooked: bool) -> None:
        if not isinstance(event, RunCompleted | RunFailed | RunCancelled | RunTerminated):
            return
        known = self._starts.pop(run_id, None)
        if known is None:
            if not hooked:
                return
            start = await run_start(self._conn, run_id)
            if start is None:
                return
            known = (start.workflow, start.on_complete, start.on_complete_queue or "default")
        workflow, target, queue = known
        if target is None:
            return
        if isinstance(event, RunCompleted) and is_ref(bytes(event.result)):
            # The hook's workflow gets the result itself, as any workflow gets its input
            # (its start stores the outcome by reference in turn, if it is large).
            result = await load_value(self._conn, bytes(event.result), f"result of {run_id}")
            event = msgspec.structs.replace(event, result=msgspec.Raw(result))
        outcome = outcome_of(run_id, workflow, event)
        assert outcome is not None
        child_id = on_complete_run_id(run_id)
        data = _encoder.encode(outcome)
        if len(data) > self._conn.max_value_bytes:  # the result alone filled a value
            data = _encoder.encode(msgspec.structs.replace(outcome, result=None))
        # With the flow control the target declares (a debounced target collapses the
        # follow-ups of runs that close within its window into one run).
        made, created = await start_declared(
            self._runs, target, queue, data, child_id, on_complete_of=run_id
        )
        if created:
            self.on_complete_started += 1
            log.info("run %s %s: started %s as %s", run_id, outcome.status, target, made)

    async def _start_restarted(self, run_id: str) -> None:
        """A restarted run's copied history is complete: make sure it has a task (its
        client enqueues one too, but may have died right after seeding)."""
        last = await self._history.last(run_id)
        start = await run_start(self._conn, run_id)
        if last is None or start is None or not isinstance(last[0], RestartSeeded):
            return  # a worker has it already
        task = Task(run_id=run_id, workflow=start.workflow, reason="restart")
        if await enqueue(self._conn, start.queue, task):
            log.info("run %s: enqueued the restart its client had not", run_id)
