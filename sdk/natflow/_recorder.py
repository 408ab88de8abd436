"""The one path by which an execution writes its run's history.

Every append is fenced by the run's last sequence: an append that meets a newer history
raises :class:`Fenced` (this worker no longer holds the run). Events get derived ids
(``<run_id>:<n>``), so a retried publish deduplicates. A new run's claim may be written
beside its first steps (:meth:`RunRecorder.expect_claim`): every other append waits for it
and is fenced by it.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
from natflow_engine import AppendConflict, Connection, HistoryStore, fields
from natflow_engine.events import (
    ChildFailed,
    ChildStarted,
    Event,
    RunBlocked,
    RunClaimed,
    RunCompleted,
    RunPaused,
    RunReleased,
    RunResumed,
    RunSuspended,
    SignalWaited,
    StepCompleted,
    StepRetrying,
    TimerScheduled,
    utcnow,
)

from ._children import start_children, stop_let_go_children
from ._record_bounds import bounded
from ._replay import WorkflowState
from ._tracing import RunTrace

# Run-level events after which the run index says "running", and those that say it waits.
_SHOWS_RUNNING = (RunClaimed, RunResumed)
_SHOWS_A_WAIT = (
    TimerScheduled,
    SignalWaited,
    StepRetrying,
    RunSuspended,
    RunPaused,
    RunBlocked,
    RunReleased,
)


class Fenced(Exception):
    """An append met a newer history: this worker no longer holds the run."""


class RunRecorder:
    """Appends one run's events: the driver's own, and those the replay core owes history.

    Attributes:
        state: The run's replay core, which the recorded outcomes are delivered to.
        run_id: The run's id.
        workflow_name: The name of the run's workflow (for logs and metrics).
        conn: The connection the run's I/O goes through.
        count: Events in the run's history, counted from its first stretch (for event ids).
        last_event: The last event appended (or read).
    """

    __slots__ = (
        "_claim",
        "_claim_alone",
        "_claimed",
        "_held",
        "_last_seq",
        "_store",
        "_trace",
        "conn",
        "count",
        "last_event",
        "run_id",
        "shows_running",
        "state",
        "workflow_name",
    )

    def __init__(
        self,
        *,
        state: WorkflowState,
        store: HistoryStore,
        conn: Connection,
        trace: RunTrace,
        count: int,
        last_seq: int,
        last_event: Event,
    ) -> None:
        self.state = state
        self.run_id = state.run_id
        self.workflow_name = state.workflow_name
        self.conn = conn
        self._store = store
        self._trace = trace
        self.count = count
        self._last_seq = last_seq
        self.last_event = last_event
        # A step outcome delivered to the workflow before it is recorded (see hold_last).
        self._held: StepCompleted | None = None
        # A claim written beside the first steps, and the moment it is in history.
        self._claim: RunClaimed | None = None
        self._claimed: anyio.Event | None = None
        self._claim_alone = False  # it went out alone (see claim_sent)
        # Whether the run index's last word on the run is "running" (a claim, a resume), so
        # a run that waits again must say so (RunSuspended); an execution always claims.
        self.shows_running = True

    def expect_claim(self, worker: str) -> None:
        """Count ``worker``'s claim as the run's next event now and hold every append until
        :meth:`write_claim` has written it, so the workflow may go on (its first steps run)
        while the claim is on its way, and nothing it does reaches history before it."""
        assert self._claim is None and self._held is None
        claim = RunClaimed(id=self.next_id(), at=utcnow(), worker=worker, delivery=1)
        self._claim, self._claimed = claim, anyio.Event()
        self.count += 1

    async def write_claim(self) -> bool:
        """Append the expected claim; False if the run moved on first (appends then stay
        held: the caller gives the execution up)."""
        claim, claimed = self._claim, self._claimed
        assert claim is not None and claimed is not None
        # Decided here and appended at once, with no wait between: see claim_sent.
        self._claim_alone = self._store.next_append_alone()
        try:
            self._last_seq = await self._store.append(self.run_id, claim, self._last_seq)
        except AppendConflict:
            return False
        self.last_event = claim
        self._trace.recorded(claim)
        self._claimed = None  # later appends go straight on (a set Event still yields)
        claimed.set()
        return True

    @property
    def last_seq(self) -> int:
        """The stream sequence of the run's last event, as this execution knows it."""
        return self._last_seq

    @property
    def claim_pending(self) -> bool:
        """Whether a claim written beside the first steps is not yet known to be in history."""
        return self._claimed is not None

    async def claim_sent(self) -> None:
        """Return once the claim written beside the first steps is on the wire (at once if
        there is none, or it is in history). A step's body waits for this: one that blocks
        the event loop, or ends the process, must not keep its run's claim (or lease) from
        the server, or another worker would take the run and run the step again.

        A claim that went out alone (an idle worker's: the wait is the latency a user sees)
        is on the wire once the connection has written what it was handed. One held for a
        batch (a busy worker's, whose throughput counts, not its latency) is waited for
        until it is in history: it goes out when the send ahead of it is done. Called after
        :meth:`write_claim` began (the steps launch after it)."""
        if self._claimed is None:
            return
        if self._claim_alone:
            await self.conn.written()
        else:
            await self.claim_written()

    async def claim_written(self) -> None:
        """Return once the claim written beside the first steps is in history (at once if
        there is none; never if it missed: the execution is then given up)."""
        claimed = self._claimed
        if claimed is not None:
            await claimed.wait()

    def hold_last(self, outcome: StepCompleted) -> StepCompleted:
        """Take a step's outcome to record with whatever the run appends next: with its
        ``run_completed`` in one message if the workflow now returns (one append less per
        run), else on its own just before that next event. Returns the outcome with its id.

        The caller delivers the outcome to the workflow before it is recorded; nothing the
        workflow does then reaches history or runs before the next append, so history order
        stays delivery order. A worker that dies in between loses the outcome, as one dying
        before the append would: the step runs again.
        """
        assert self._held is None
        held = outcome if outcome.id else msgspec.structs.replace(outcome, id=self.next_id())
        self._held = held
        return held

    async def append(self, event: Event, *, rollup: bool = False) -> Event:
        event = event if event.id else msgspec.structs.replace(event, id=self.next_id())
        held = self._held
        if held is not None and type(event) is RunCompleted and not rollup:
            self._held = None
            carried = msgspec.structs.replace(event, last_step=held, v=2)
            await self._write(carried, rollup=False, events=(held, event))
            return event
        await self.append_held()
        await self._write(event, rollup=rollup, events=(event,))
        return event

    async def append_held(self) -> None:
        """Record the held outcome on its own (the workflow went on after it)."""
        held, self._held = self._held, None
        if held is not None:
            await self._write(held, rollup=False, events=(held,))

    async def _write(self, message: Event, *, rollup: bool, events: tuple[Event, ...]) -> None:
        if self._claimed is not None:
            await self.claim_written()
        try:
            self._last_seq = await self._store.append(
                self.run_id, message, self._last_seq, rollup=rollup
            )
        except AppendConflict as exc:
            raise Fenced() from exc
        self.count += len(events)
        self.last_event = events[-1]
        for event in events:
            self._trace.recorded(event)
            if isinstance(event, _SHOWS_RUNNING):
                self.shows_running = True
            elif isinstance(event, _SHOWS_A_WAIT):
                self.shows_running = False

    def next_id(self) -> str:
        """The id of the next event appended (after a held outcome, if any)."""
        return f"{self.run_id}:{self.count + (1 if self._held is None else 2)}"

    def fields(self, step: str | None = None) -> dict[str, Any]:
        return fields(self.run_id, self.workflow_name, step)

    async def flush(self) -> None:
        """Append what the replay core owes history (children it declares started first).

        Nothing while the run is paused: what the workflow asked for meanwhile (a child, a
        timer, after a signal or a step's outcome reached it) is owed until it is resumed,
        so no child starts and no timer is set. An execution that lets the run go first
        loses nothing: replay asks for the same again.
        """
        if self.state.paused:
            return
        # A child refused at its start is failed at once, and what the workflow does about
        # it may need records of its own: flush until nothing is owed.
        while records := self.state.take_records():
            await self._flush(records)
        await stop_let_go_children(self.conn, self.state)  # started (and recorded) first

    async def _flush(self, records: list[Event]) -> None:
        children = [e for e in records if isinstance(e, ChildStarted)]
        if children:
            refused = await start_children(self.conn, self.state, children)
        for event in records:
            await self.append(event)
            if isinstance(event, ChildStarted) and event.seq in refused:
                failed = await self.append(
                    ChildFailed(
                        id=self.next_id(),
                        at=utcnow(),
                        seq=event.seq,
                        name=event.name,
                        child_run_id=event.child_run_id,
                        status="failed",
                        error=bounded(refused[event.seq]),
                    )
                )
                assert isinstance(failed, ChildFailed)
                self.state.deliver(failed)
