"""Operations on runs that need no workflow code: start, describe, steps, history."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import msgspec

from ._connection import Connection
from ._errors import ErrorInfo, NatflowError, PermissionDenied, RunNotFound
from ._history import AppendConflict, CorruptHistory, History, HistoryStore
from ._index import RunIndex
from ._limits import explain as explain_wait
from ._names import check_queue, check_run_id, check_workflow_name
from ._sealing import open_events, seal
from ._site_index import site_run
from ._start_consumers import starts_taken
from ._state import CLOSED_STATUSES, RunInfo, StepInfo, fold_run, fold_steps
from ._streams import ensure_streams, start_subject
from ._tasks import Task, enqueue, send_start_task
from ._values import check_value_size, load_event, load_events
from .events import (
    Event,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunRestarted,
    RunStarted,
    RunTerminated,
    Trigger,
    encode_event,
    utcnow,
)

log = logging.getLogger("natflow.runs")

_INLINE_START = 16 * 1024  # a larger start event is read from history instead


_RUNS_DENIED: Final = "natflow_runs_denied"  # this connection may not read histories


def new_run_id() -> str:
    return uuid.uuid4().hex


def held_as_corrupt(info: RunInfo, seq: int, reason: str) -> None:
    """``info`` as a worker holds the run: blocked by the event at ``seq`` that does not
    decode (its history, read leniently, left the event out)."""
    info.status = "blocked"
    info.error = ErrorInfo(
        type="CorruptHistory",
        message=f"history event at stream sequence {seq} does not decode: {reason}",
    )
    info.current = f"blocked: {info.error.message}"


@dataclass(frozen=True)
class Addressee:
    """What a signal or control needs to know of its run: how it ended (``status``; "open"
    while it runs), and at a hub, the site it lives at."""

    status: str
    site: str | None = None

    @property
    def is_closed(self) -> bool:
        return self.status in CLOSED_STATUSES


_ENDS: Final[dict[type, str]] = {
    RunCompleted: "completed",
    RunFailed: "failed",
    RunCancelled: "cancelled",
    RunTerminated: "terminated",
}


class Runs:
    """Starts and reads runs over one connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.history = HistoryStore(conn)

    async def start(
        self,
        workflow: str,
        queue: str,
        input_json: bytes,
        run_id: str | None = None,
        *,
        parent: str | None = None,
        not_before: datetime | None = None,
        trigger: Trigger | None = None,
        trace_context: dict[str, str] | None = None,
        on_complete: tuple[str, str] | None = None,
        retention: float | None = None,
        on_complete_of: str | None = None,
        rate_limited: str | None = None,
        debounce: str | None = None,
        priority: int | None = None,
    ) -> tuple[str, bool]:
        """Create the run unless ``run_id`` exists; returns ``(run_id, created)``.

        An existing run of another workflow is :class:`NatflowError` naming both, as is one
        that is not a child of ``parent`` (when given).

        The run is created by a conditional append that expects the run to have no history,
        so two starts of one id make one run. Then its task is written, without waiting for
        its acknowledgement (one round trip for ``start()``, not two): if this process dies
        in between, or the task's write is lost, the engine's dispatcher enqueues it (a start
        is never lost).
        ``trace_context`` is the W3C trace context of the starter's span, kept in history.
        ``on_complete`` is ``(workflow, queue)`` of the run to start when this one closes;
        ``retention`` the seconds this run is kept once closed (None: the engine's setting);
        ``on_complete_of`` the closed run whose outcome this run's input is;
        ``rate_limited`` the rate limit that set ``not_before``; ``debounce`` the debounce
        cell the run takes its input from; ``priority`` orders it among runs waiting for a
        concurrency slot (None: its workflow's default) (README "Flow control").
        """
        run_id = check_run_id(run_id if run_id is not None else new_run_id())
        check_workflow_name(workflow)
        check_queue(queue)
        if on_complete is not None:
            check_workflow_name(on_complete[0])
            check_queue(on_complete[1])
        if self.conn.codec is not None:  # sealed here, so the task's inline copy is too
            input_json = seal(self.conn.codec, input_json)
        check_value_size(self.conn, f"input of run {run_id!r}", len(input_json))
        await ensure_streams(self.conn)
        event = RunStarted(
            id=f"{run_id}:1",
            at=utcnow(),
            workflow=workflow,
            queue=queue,
            input=msgspec.Raw(input_json),
            parent=parent,
            not_before=not_before,
            trigger=trigger,
            trace_context=trace_context,
            on_complete=on_complete[0] if on_complete else None,
            on_complete_queue=on_complete[1] if on_complete else None,
            retention=retention,
            on_complete_of=on_complete_of,
            rate_limited=rate_limited,
            debounce=debounce,
            priority=priority,
        )
        # A run that starts now, of a queue and workflow whose workers take new runs from
        # history (``_start_consumers``): its start goes where they read, and no task is
        # written. Looked up before the append: a start consumer that exists then delivers
        # the start. Otherwise (no such consumer yet, or a delayed start, which the engine's
        # timer wakes) the start goes on the run-level subject, where a start consumer
        # created meanwhile does not see it, and its task is written as before.
        taken = not_before is None and await starts_taken(self.conn, queue, workflow)
        subject = start_subject(run_id, queue, workflow) if taken else None
        try:
            seq = await self.history.append(run_id, event, 0, subject=subject)
        except AppendConflict:
            info = await self.describe(run_id)
            if info.workflow != workflow:
                raise NatflowError(
                    f"run {run_id!r} exists as a run of workflow {info.workflow!r}; it cannot "
                    f"be started as {workflow!r}: use another run id"
                ) from None
            if parent is not None and info.parent != parent:
                # Its outcome goes to its own parent (or nobody): this one would wait for good.
                owner = f"a child of run {info.parent!r}" if info.parent else "a top-level run"
                raise NatflowError(
                    f"run {run_id!r} exists as {owner}, so it cannot be a child of run "
                    f"{parent!r}: give ctx.child a run_id no run has, or none (one is derived "
                    "from the parent's)"
                ) from None
            if (
                info.status == "pending"
                and not_before is None
                and not await starts_taken(self.conn, info.queue, info.workflow)
            ):
                # the first starter may have died before enqueueing
                await enqueue(self.conn, info.queue, Task(run_id=run_id, workflow=info.workflow))
            return run_id, False
        if not_before is None and not taken:
            # No worker takes this queue's and workflow's starts from history (yet): a task.
            encoded = encode_event(event)
            inline = len(encoded) <= _INLINE_START
            task = Task(
                run_id=run_id,
                workflow=workflow,
                reason="start",
                start_seq=seq if inline else 0,
                start=msgspec.Raw(encoded if inline else b"null"),
            )
            await send_start_task(self.conn, queue, task)
        return run_id, True

    async def events(self, run_id: str) -> list[Event]:
        """The run's events; one that does not decode is left out (and logged)."""
        try:
            history = await self._read(run_id)
        except RunNotFound:
            elsewhere = await site_run(self.conn, run_id)
            if elsewhere is None:
                raise
            raise RunNotFound(
                run_id,
                f"run {run_id!r} lives at site {elsewhere.site!r}, which keeps its history; "
                f"the hub has its summary only (`natflow runs show {run_id}`): read the "
                f"history at the site, connected to its server",
            ) from None
        return await self._opened(run_id, history)

    async def opened_history(self, run_id: str) -> History:
        """The run's :class:`History` as :meth:`events` reads it, with ``corrupt`` listing
        the events left out because they do not decode (a replay check must not call a run
        compatible that a worker holds as blocked for one)."""
        history = await self._read(run_id)
        events = await self._opened(run_id, history)
        return History(run_id, events, history.last_seq, history.corrupt)

    async def _opened(
        self, run_id: str, history: History, *, result_only: bool = False
    ) -> list[Event]:
        # Large values read back from the object store (only the run's result, for a
        # summary), then opened where this connection holds the key; what it cannot open
        # stays sealed.
        if result_only:
            events = [
                await load_event(self.conn, e, run_id)
                if isinstance(e, RunCompleted | RunFailed)
                else e
                for e in history.events
            ]
        else:
            events = await load_events(self.conn, history.events, run_id)
        return open_events(self.conn.codec, events, run_id, strict=False)

    async def _read(self, run_id: str) -> History:
        check_run_id(run_id)
        await ensure_streams(self.conn)
        history = await self.history.read(run_id, lenient=True)
        if not history.events and not history.corrupt:
            raise RunNotFound(run_id)
        for seq, reason in history.corrupt:
            log.warning("run %s: history event #%d does not decode (%s)", run_id, seq, reason)
        return history

    async def readable(self, run_id: str) -> Addressee | None:
        """Whether the run ended, and at a hub where it lives: what a signal or a control
        needs to know, from the run's last event (one read; folding the whole history made
        each signal to a long run cost a read of all of it). :class:`RunNotFound` if there is
        no such run. None if this connection may not read runs (a ``signaller``): then the
        engine's signal intake checks the run, and dead-letters what cannot reach it. A
        denial is remembered: asked again, the server would log a violation each time."""
        if self.conn.extras.get(_RUNS_DENIED):
            return None
        check_run_id(run_id)
        try:
            await ensure_streams(self.conn)
            last = await self.history.last(run_id)
        except PermissionDenied:
            self.conn.extras[_RUNS_DENIED] = True
            return None
        except CorruptHistory:  # held as blocked by its workers: open, as far as signals go
            return Addressee("blocked")
        if last is None:
            elsewhere = await site_run(self.conn, run_id)  # a hub's copy of a site's run
            if elsewhere is None:
                raise RunNotFound(run_id)
            return Addressee(elsewhere.status, elsewhere.site)
        if isinstance(last[0], RunRestarted):  # only a closed run is restarted: which end?
            return Addressee((await self.describe(run_id, explain=False)).status)
        return Addressee(_ENDS.get(type(last[0]), "open"))

    async def describe(self, run_id: str, *, explain: bool = True) -> RunInfo:
        """The run's :class:`RunInfo`. With ``explain``, an open run that waits for a slot of
        a concurrency limit says so in ``current`` (one more read). At a hub, a site's run
        that is not here is its hub copy's summary."""
        try:
            history = await self._read(run_id)
        except RunNotFound:
            elsewhere = await site_run(self.conn, run_id)  # a hub's copy of a site's run
            if elsewhere is None:
                raise
            return elsewhere
        events = await self._opened(run_id, history, result_only=True)
        info = fold_run(run_id, events)
        if info is None:
            raise RunNotFound(run_id)
        if history.corrupt and not info.is_closed:
            held_as_corrupt(info, *history.corrupt[0])
            return info
        # A claim as the last event: a worker has the run now and fires the timer itself.
        overdue = info.due_at is not None and info.due_at <= utcnow()
        if overdue and events and not isinstance(events[-1], RunClaimed):
            await self._overdue(info)
        if explain:
            await explain_wait(self.conn, info)
        return info

    async def _overdue(self, info: RunInfo) -> None:
        """A timer past due: if the engine saw it pass unfired, say so as the index does
        ("timer 'x' due since ..., waiting for a worker", status pending)."""
        indexed = await RunIndex(self.conn).get(info.run_id)
        if indexed is not None and indexed.status == "pending" and indexed.due_at == info.due_at:
            info.status, info.current = indexed.status, indexed.current

    async def steps(self, run_id: str) -> list[StepInfo]:
        return fold_steps(await self.events(run_id))
