"""One run driven by one worker: replay its history, then continue live.

The workflow's coroutines run on a :class:`WorkflowLoop`; this driver runs on the worker's
asyncio loop. It delivers recorded outcomes (steps, timers, signals) in history order
(replay), then runs new commands for real. Every live outcome is in history before anything
the workflow does after it: appended first and delivered second, but for a completed step,
delivered first and appended before anything the workflow asked for on receiving it (with
the run's end, in one message, when the workflow returns right after it). So history order
is delivery order and every replay decides races (a signal against its timeout, parallel
branches) alike.

When the workflow can only wait (for a timer further off than :data:`HOLD_TIMERS_UNDER`, or
for a signal), the driver returns ``SUSPENDED`` and the worker lets the run go: a sleeping
run holds no worker and no memory.

The driver's collaborators, each over the same :class:`RunRecorder` (the one path to the
run's history): :class:`RunClaimer` (taking the run), :class:`LiveSteps` (steps launched and
recorded), :class:`SignalIntake` (signals moved in), :class:`RunTimers` (timers fired), and
``_run_endings`` (how the history ends).
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from natflow_engine import (
    FENCED,
    Connection,
    ErrorInfo,
    History,
    HistoryStore,
    NatflowError,
    one_error,
    receive_soon,
)
from natflow_engine.events import (
    TERMINAL_EVENTS,
    RunReleased,
    RunSuspended,
    RunTerminated,
    events_before,
    utcnow,
)

from ._claim import RunClaimer
from ._commands import Finished, Item, SignalsArrived, StillRunning, TimerDue
from ._live_steps import LiveSteps
from ._outcome import HOLD_FOR_CHILDREN, HOLD_TIMERS_UNDER, Outcome
from ._preclaim import ClaimAhead, Preclaim
from ._recorder import Fenced, RunRecorder
from ._replay import Evicted, WorkflowState
from ._run_endings import end, end_blocked_if_asked, fail, finish, record_block
from ._run_timers import RunTimers
from ._signal_intake import SignalIntake
from ._steps import StepRuntime, run_runtime
from ._tracing import RunTrace
from ._workflow import Workflow

__all__ = ["HOLD_TIMERS_UNDER", "Evicted", "Outcome", "RunExecution", "StepRuntime"]

log = logging.getLogger("natflow.worker")


class RunExecution:
    """Replays and continues one run; see the module docstring.

    The replay core (:class:`WorkflowState`) decides what the workflow asks for; this class
    does the I/O: it appends what the core owes history, runs steps, fires timers and moves
    signals in, and delivers each outcome back to the core once it is recorded.
    """

    def __init__(
        self,
        *,
        workflow: Workflow,
        history: History,
        store: HistoryStore,
        conn: Connection,
        identity: str,
        runtime: StepRuntime,
        delivery: int = 1,
        optimistic: bool = False,
        preclaimed: Preclaim | ClaimAhead | None = None,
    ) -> None:
        self.state = WorkflowState(workflow, history)
        self.workflow = workflow
        self.run_id = history.run_id
        count = events_before(self.state.start) + len(history.events)  # for event ids
        last_seq, last_event = history.last_seq, history.events[-1]
        # Claimed already, beside the history read; or a new run claimed beside its first
        # steps (see _preclaim).
        self._preclaimed = preclaimed if isinstance(preclaimed, Preclaim) else None
        self._claim_ahead = isinstance(preclaimed, ClaimAhead)
        self._claim_missed = False  # that claim met a newer history
        self._identity = identity
        if isinstance(preclaimed, Preclaim):
            count, last_seq, last_event = count + 1, preclaimed.seq, preclaimed.event
        self._draining = False
        self._holds = False  # this execution's claim of the run is in history
        self._signals_first = False  # signals waited when the run was taken
        self._signals_early = False  # told of signals before it was live
        self._send: MemoryObjectSendStream[Item] | None = None
        self._trace = RunTrace(self.run_id, workflow.name, self.state.start, history.events)
        self._rec = RunRecorder(
            state=self.state,
            store=store,
            conn=conn,
            trace=self._trace,
            count=count,
            last_seq=last_seq,
            last_event=last_event,
        )
        self._claimer = RunClaimer(
            self._rec, identity=identity, delivery=delivery, optimistic=optimistic
        )
        self._steps = LiveSteps(self._rec, run_runtime(runtime, workflow), self._trace)
        self._signals = SignalIntake(self._rec)
        self._timers = RunTimers(self._rec, self._signals, self._notify)

    async def release(self, reason: str) -> None:
        """Record that this worker lets the run go before its steps ended (see
        ``RunReleased``), after the step outcome it may hold for its next append. Best
        effort: where the run moved on meanwhile, or the connection is gone, nothing is
        written, and the next holder counts this one as a death, as for a crash."""
        rec = self._rec
        if not self._holds or self._claim_missed or rec.claim_pending:
            return
        if self._steps.inflight == 0:  # it only waited (a timer held in memory): no step cut
            return
        if isinstance(rec.last_event, TERMINAL_EVENTS):
            return
        try:
            await rec.append(RunReleased(id="", at=utcnow(), worker=self._identity, reason=reason))
        except (Fenced, NatflowError) as exc:
            log.debug("run %s: release not recorded (%s)", self.run_id, exc, extra=rec.fields())

    def drain(self) -> None:
        """Start no new step; once running ones are recorded, hand the run back."""
        self._draining = True
        self._notify(SignalsArrived())  # wake the driver if it only waits

    def signals_arrived(self) -> None:
        self._notify(SignalsArrived())

    @property
    def key_wait(self) -> tuple[int, datetime] | None:
        """Handed back for a signal sealed with a key this worker lacks: the run's last
        sequence then, and when the wait for a worker with the key ends (see KeyWaits)."""
        ends = self._signals.key_patience_ends
        return None if ends is None else (self._rec.last_seq, ends)

    @property
    def next_due(self) -> datetime | None:
        """When the run's earliest pending timer comes due (None if there is none)."""
        return self.state.next_due

    @property
    def waits_for_signals(self) -> bool:
        return self.state.waits_for_signals

    @property
    def signal_cursor(self) -> int:
        """The signal stream sequence history has taken in up to."""
        return self.state.signal_cursor

    def timers_to_index(self) -> list[tuple[int, str, datetime]]:
        return self.state.timers_to_index()

    def _notify(self, item: Item) -> None:
        if self._send is not None:
            self._send.send_nowait(item)
        elif isinstance(item, SignalsArrived):
            self._signals_early = True  # not live yet: look once it is

    async def execute(self) -> Outcome:
        """Replay, claim the run, continue live until it ends, waits, or is lost."""
        try:
            self._trace.attach()  # the step tasks started below inherit the run's trace
            self.state.begin()
            if self.state.block is not None:
                if await end_blocked_if_asked(self._rec):
                    return Outcome.CANCELLED
                await record_block(self._rec)
                return Outcome.BLOCKED
            claimer = self._claimer
            if self._claim_ahead:  # the lease's look, beside, tells of waiting signals
                if self._draining:
                    return Outcome.HANDED_BACK
                claimed, work = True, False
            elif self._preclaimed is not None:  # see _preclaim
                self._trace.recorded(self._preclaimed.event)
                if self._draining:
                    return Outcome.HANDED_BACK
                claimed = True
                work = self._preclaimed.signal_seq > self.state.signal_cursor
            else:
                has_work = await claimer.has_work()
                if has_work is None:
                    return Outcome.SUSPENDED  # a duplicate or stale wake-up: write nothing
                work = has_work
                if self._draining:  # a worker on its way out claims nothing (nor looks dead
                    return Outcome.HANDED_BACK  # to the poison check for a claim it gave up)
                if work or not self.state.has_launches:
                    claimed = await claimer.claim()  # signals, if known to wait, go in first
                else:  # a step would start at once: a waiting cancel must be read before it
                    claimed, work = await claimer.claim_and_look()
            if not claimed:
                return Outcome.STALE if claimer.optimistic else Outcome.LOST
            self._holds = True
            # A nudge that came before the run was live (while it was claimed) counts too.
            self._signals_first = work or self._signals_early
            send, receive = anyio.create_memory_object_stream[Item](math.inf)
            self._send = self._steps.send = send
            outcome = Outcome.STALE  # what a claim beside the first steps that missed makes
            try:
                with send, receive, one_error():  # the worker handles the error, not a group
                    async with anyio.create_task_group() as tg:
                        if self._claim_ahead:
                            self._claim_beside(tg)
                        outcome = await self._guarded_live(tg, receive)
                        await self._rec.claim_written()  # an outcome that appended nothing
                        tg.cancel_scope.cancel()
            finally:
                self._send = self._steps.send = None
            return Outcome.STALE if self._claim_missed else outcome
        finally:
            self._dispose()

    def _claim_beside(self, tg: anyio.abc.TaskGroup) -> None:
        """Write the run's claim beside its first steps (every append waits for it). One
        that meets a newer history ends the execution: STALE, the run is read anew, and what
        its steps did meanwhile is never recorded (steps run at least once, and are recorded
        exactly once)."""
        self._rec.expect_claim(self._identity)

        async def claim() -> None:
            if not await self._rec.write_claim():
                log.debug(
                    "run %s: claim beside the first steps missed; reading it anew", self.run_id
                )
                self._claim_missed = True
                tg.cancel_scope.cancel()

        tg.start_soon(claim, name=f"claim {self.run_id}")

    async def _guarded_live(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Item]
    ) -> Outcome:
        try:
            return await self._live(tg, receive)
        except Fenced:
            FENCED.labels(self.workflow.name, "append").inc()
            log.info(
                "run %s: another worker took it over; stepping back",
                self.run_id,
                extra=self._rec.fields(),
            )
            return Outcome.LOST

    async def _live(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Item]
    ) -> Outcome:
        state, rec, steps = self.state, self._rec, self._steps
        assert state.root is not None
        if self._signals_first:  # a cancel sent before this execution must stop it first
            await rec.flush()
            await self._signals.move()
        # A paused run does not end: a signal or a child's outcome taken in meanwhile may
        # let the workflow return, and it is recorded once the run is resumed.
        while not state.root.done() or state.paused:
            if state.terminated is not None:
                return await end(rec, RunTerminated, state.terminated)
            await rec.flush()
            if state.root.done() and not state.paused:  # a child refused at its start
                break  # ended the workflow
            if not (self._draining or state.paused):  # else the next holder (or the resumed
                steps.launch(tg)  # run) issues these again
            state.drop_abandoned_timers()
            if not state.paused:
                self._timers.arm_all()
            if steps.inflight == 0:
                if self._draining:
                    return Outcome.HANDED_BACK
                if state.paused:  # only a resume (or a cancellation) can move it on
                    await rec.append_held()  # a last step's outcome, held for the run's end
                    if not await self._signals.move():
                        return Outcome.SUSPENDED
                    continue
                if not (state.timers or state.waits_for_signals or state.waits_for_children):
                    return await fail(
                        rec,
                        ErrorInfo(
                            type="NatflowError",
                            message="the workflow awaits something natflow cannot deliver (only "
                            "ctx calls may be awaited inside a workflow)",
                        ),
                    )
                due = self.next_due
                if due is None or (due - utcnow()).total_seconds() > HOLD_TIMERS_UNDER:
                    if await self._signals.move():
                        continue
                    if state.waits_for_children:
                        # Children in flight often end soon: stay held a moment, so a
                        # fan-out's outcomes are taken in by one execution rather than each
                        # waking (and replaying) the parent again.
                        item = None
                        with anyio.move_on_after(HOLD_FOR_CHILDREN):
                            item = await receive.receive()
                        if item is not None:
                            await self._handle(item)
                            continue
                    await self._show_the_wait()
                    return Outcome.SUSPENDED
            await self._handle(await receive_soon(receive))
        await rec.flush()
        return await finish(rec)

    async def _show_the_wait(self) -> None:
        """Tell the run index what the run waits for, where nothing this execution recorded
        did: it said "running" since the claim (an unrelated signal, a resume, a takeover)."""
        if not self._rec.shows_running:
            return
        shown = self.state.waiting_as()
        if shown is not None:
            status, current, due_at = shown
            await self._rec.append(
                RunSuspended(id="", at=utcnow(), status=status, current=current, due_at=due_at)
            )

    async def _handle(self, item: Item) -> None:
        if isinstance(item, Finished):
            await self._steps.finished(item)
        elif isinstance(item, StillRunning):
            await self._steps.still_running(item)
        elif isinstance(item, TimerDue):
            await self._timers.fire(item.seq)
        else:
            await self._signals.move()

    def _dispose(self) -> None:
        self._trace.detach()
        self._timers.cancel()
        self.state.close()
