"""One run driven by one worker: replay its history, then continue live.

The workflow's coroutines run on a :class:`WorkflowLoop`; this driver runs on the worker's
asyncio loop. It delivers recorded outcomes (steps, timers, signals) in history order
(replay), then runs new commands for real. Every live outcome is appended to history first
and delivered to the workflow second, so history order is delivery order and every replay
decides races (a signal against its timeout, parallel branches) alike.

When the workflow can only wait (for a timer further off than :data:`HOLD_TIMERS_UNDER`, or
for a signal), the driver returns ``SUSPENDED`` and the worker lets the run go: a sleeping
run holds no worker and no memory.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from datetime import datetime
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from natflow_engine import (
    CANCEL,
    CHILD,
    CONTROL,
    FENCED,
    PAUSE,
    RESUME,
    SIGNALS_DELIVERED,
    SIGNALS_REJECTED,
    STEP_RETRIES,
    STEPS,
    TAKEOVERS,
    TERMINATE,
    AppendConflict,
    BadSignal,
    Connection,
    ErrorInfo,
    History,
    HistoryStore,
    InvalidInput,
    NatflowError,
    PayloadTooLarge,
    PermissionDenied,
    Runs,
    check_value_size,
    decode_child_outcome,
    encode_value,
    error_info,
    fields,
    labelled,
    last_signal_seq,
    load_value,
    open_sealed,
    parse,
    pending_signals,
    quarantined,
    send,
    sequence,
    start_declared,
    stored_at,
)
from natflow_engine.events import (
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    RunBlocked,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunResumed,
    RunTerminated,
    SignalReceived,
    SignalRejected,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepStarted,
    TimerFired,
    utcnow,
)

from ._commands import (
    ChildCommand,
    Finished,
    Item,
    SignalsArrived,
    StepCommand,
    StillRunning,
    TimerDue,
    WaitCommand,
)
from ._continuation import (
    ContinueAsNew,
    check_input_size,
    events_before,
    next_stretch,
    run_stored_at,
)
from ._preclaim import Preclaim
from ._replay import Evicted, WorkflowState, cancel_reason
from ._steps import StepRuntime, rate_fields, run_runtime, run_step
from ._tracing import RunTrace
from ._watchdog import running_step
from ._workflow import Workflow

__all__ = ["Evicted", "Outcome", "RunExecution", "StepRuntime"]

log = logging.getLogger("natflow.worker")

# A timer due sooner than this is waited for while holding the run; a later one lets it go.
HOLD_TIMERS_UNDER = 1.0
HOLD_FOR_CHILDREN = 1.0  # seconds a run waiting only for child runs stays held
_CHILD_STARTS_AT_ONCE = 64
_MAX_ERROR_CHARS = 1 << 20  # of an error's message, and of its traceback
_MAX_REASON = 4096  # characters of a cancel reason recorded (a huge one must still cancel)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"  # waits for a timer or a signal; the worker lets it go
    LOST = "lost"  # another worker holds the run now; this one steps back
    STALE = "stale"  # a claim without reading history met a newer one: read it and retry
    HANDED_BACK = "handed_back"  # the worker is draining; running steps were recorded
    CANCELLED = "cancelled"  # cancelled (after its cleanup) or terminated
    CONTINUED = "continued"  # continued as new: a fresh stretch of history waits to run


class _Fenced(Exception):
    """An append met a newer history: this worker no longer holds the run."""


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
        preclaimed: Preclaim | None = None,
    ) -> None:
        self.state = WorkflowState(workflow, history)
        self.workflow = workflow
        self.run_id = history.run_id
        self._store = store
        self._conn = conn
        self._identity = identity
        self._runtime = run_runtime(runtime, workflow)
        self._delivery = delivery
        self._optimistic = optimistic  # history was not read: a claim conflict is no verdict
        self._count = events_before(self.state.start) + len(history.events)  # for event ids
        self._last_seq = history.last_seq
        self._last_event = history.events[-1]
        self._preclaimed = preclaimed  # claimed already, beside the history read
        if preclaimed is not None:
            self._count, self._last_seq = self._count + 1, preclaimed.seq
            self._last_event = preclaimed.event
        self._inflight = 0
        self._armed: dict[int, asyncio.TimerHandle] = {}
        self._draining = False
        self._signals_first = False  # signals waited when the run was taken
        self._signals_early = False  # told of signals before it was live
        self._created_at: datetime | None = None  # when the server stored run_started
        self._send: MemoryObjectSendStream[Item] | None = None
        self._trace = RunTrace(self.run_id, workflow.name, self.state.start, history.events)

    def drain(self) -> None:
        """Start no new step; once running ones are recorded, hand the run back."""
        self._draining = True
        self._notify(SignalsArrived())  # wake the driver if it only waits

    def signals_arrived(self) -> None:
        self._notify(SignalsArrived())

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
                await self._record_block()
                return Outcome.BLOCKED
            if self._preclaimed is not None:  # see _preclaim
                self._trace.recorded(self._preclaimed.event)
                if self._draining:
                    return Outcome.HANDED_BACK
                claimed = True
                work = self._preclaimed.signal_seq > self.state.signal_cursor
            else:
                has_work = await self._has_work()
                if has_work is None:
                    return Outcome.SUSPENDED  # a duplicate or stale wake-up: write nothing
                work = has_work
                if self._draining:  # a worker on its way out claims nothing (nor looks dead
                    return Outcome.HANDED_BACK  # to the poison check for a claim it gave up)
                if work or not self.state.has_launches:
                    claimed = await self._claim()  # signals, if known to wait, go in first
                else:  # a step would start at once: a waiting cancel must be read before it
                    claimed, work = await self._claim_and_look()
            if not claimed:
                return Outcome.STALE if self._optimistic else Outcome.LOST
            # A nudge that came before the run was live (while it was claimed) counts too.
            self._signals_first = work or self._signals_early
            send, receive = anyio.create_memory_object_stream[Item](math.inf)
            self._send = send
            try:
                async with anyio.create_task_group() as tg:
                    outcome = await self._guarded_live(tg, receive)
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1:  # the worker handles the error, not the group
                    raise group.exceptions[0] from None
                raise
            return outcome
        finally:
            self._dispose()

    async def _has_work(self) -> bool | None:
        """Whether taking the run now would change anything (None: no claim is written).

        True means signals wait to be moved in; False that this is not known yet.
        """
        if self.state.has_commands:
            return False
        due = self.next_due
        if due is not None and (due - utcnow()).total_seconds() <= HOLD_TIMERS_UNDER:
            return False
        # A signal for a wait, or a cancellation for any waiting run.
        return True if await self._signals_waiting() else None

    async def _claim_and_look(self) -> tuple[bool, bool]:
        """Claim the run and look for waiting signals at once (one round trip of time)."""
        found: list[bool] = []

        async def look() -> None:
            found.append(await self._signals_waiting())

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(look)
                claimed = await self._claim()
        except BaseExceptionGroup as group:
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return claimed, found[0]

    async def _signals_waiting(self) -> bool:
        """Whether signals (or a cancel) for this run wait outside its history."""
        return await last_signal_seq(self._conn, self.run_id) > self.state.signal_cursor

    async def _append(self, event: Event, *, rollup: bool = False) -> Event:
        event = (
            msgspec.structs.replace(event, id=f"{self.run_id}:{self._count + 1}")
            if not event.id
            else event
        )
        try:
            self._last_seq = await self._store.append(
                self.run_id, event, self._last_seq, rollup=rollup
            )
        except AppendConflict as exc:
            raise _Fenced() from exc
        self._count += 1
        self._last_event = event
        self._trace.recorded(event)
        return event

    async def _open(self, payload: bytes, name: str) -> bytes:
        what = f"signal {name!r} to run {self.run_id!r}"
        return open_sealed(self._conn.codec, await load_value(self._conn, payload, what), what)

    def _next_id(self) -> str:
        return f"{self.run_id}:{self._count + 1}"

    def _fields(self, step: str | None = None) -> dict[str, Any]:
        return fields(self.run_id, self.workflow.name, step)

    async def _claim(self) -> bool:
        try:
            await self._append(
                RunClaimed(
                    id=self._next_id(),
                    at=utcnow(),
                    worker=self._identity,
                    delivery=self._delivery,
                )
            )
        except _Fenced:
            if self._optimistic:
                return False
            FENCED.labels(self.workflow.name, "claim").inc()
            log.info(
                "run %s: claimed by another worker first; stepping back",
                self.run_id,
                extra=self._fields(),
            )
            return False
        if self._delivery > 1 and self.state.last_holder not in (None, self._identity):
            TAKEOVERS.labels(self.state.start.queue, "redelivered").inc()
            log.info(
                "run %s: taken over from worker %s (delivery %d)",
                self.run_id,
                self.state.last_holder,
                self._delivery,
                extra=self._fields(),
            )
        return True

    async def _record_block(self) -> None:
        block = self.state.block
        assert block is not None
        info = ErrorInfo(type="NonDeterminismError", message=str(block))
        last = self._last_event
        if isinstance(last, RunBlocked) and last.error.message == info.message:
            return
        log.error("%s", block, extra=self._fields())
        try:
            await self._append(
                RunBlocked(id=self._next_id(), at=utcnow(), position=block.position, error=info)
            )
        except _Fenced:
            log.info("run %s changed while being blocked; it will be retried", self.run_id)

    async def _flush_records(self) -> None:
        # A child refused at its start is failed at once, and what the workflow does about
        # it may need records of its own: flush until nothing is owed.
        while records := self.state.take_records():
            await self._flush(records)

    async def _flush(self, records: list[Event]) -> None:
        children = [e for e in records if isinstance(e, ChildStarted)]
        if children:
            # Started before they are recorded: a start is idempotent on the child's id
            # (derived from this run's id and the position), so a crash in between makes the
            # replay start the same child again, which finds it and makes no second. Started
            # together: a fan-out's starts are round trips that need not wait on each other.
            limit = anyio.CapacityLimiter(_CHILD_STARTS_AT_ONCE)
            refused: dict[int, ErrorInfo] = {}

            async def start(event: ChildStarted) -> None:
                async with limit:
                    try:
                        await self._start_child(event)
                    except (InvalidInput, NatflowError) as exc:
                        if isinstance(exc, PermissionDenied):
                            raise  # a deployment problem, not this child's: retried later
                        refused[event.seq] = error_info(exc)  # e.g. its id is another's run

            async with anyio.create_task_group() as tg:
                for child in children:
                    tg.start_soon(start, child)
        for event in records:
            await self._append(event)
            if isinstance(event, ChildStarted) and event.seq in refused:
                failed = await self._append(
                    ChildFailed(
                        id=self._next_id(),
                        at=utcnow(),
                        seq=event.seq,
                        name=event.name,
                        child_run_id=event.child_run_id,
                        status="failed",
                        error=self._bounded(refused[event.seq]),
                    )
                )
                assert isinstance(failed, ChildFailed)
                self.state.deliver(failed)

    async def _start_child(self, event: ChildStarted) -> None:
        command = self.state.command(event.seq)
        assert isinstance(command, ChildCommand)
        await start_declared(  # with the flow control the child's workflow declares
            Runs(self._conn),
            command.name,
            command.queue,
            command.input_json,
            command.child_run_id,
            child_of=self.run_id,
        )

    async def _record_child(self, seq: int, payload: bytes) -> None:
        """Record a ``$child`` signal (a child's outcome, sent by the engine) once."""
        try:
            outcome = decode_child_outcome(payload)
        except msgspec.DecodeError as exc:  # not the engine's: anyone may publish a subject
            await self._append(
                SignalRejected(
                    id=self._next_id(),
                    at=utcnow(),
                    signal_seq=seq,
                    name=CHILD,
                    reason=f"not a child run's outcome: {exc}"[:_MAX_REASON],
                )
            )
            SIGNALS_REJECTED.labels("worker").inc()
            return
        command = self.state.open_child(outcome.child_run_id)
        if command is None:  # a duplicate, or a child this run does not know
            log.info("run %s: outcome of child %s ignored", self.run_id, outcome.child_run_id)
            return
        event: ChildCompleted | ChildFailed
        if outcome.status == "completed":
            event = ChildCompleted(
                id=self._next_id(),
                at=utcnow(),
                seq=command.seq,
                name=command.name,
                child_run_id=command.child_run_id,
                result=msgspec.Raw(await self._open(bytes(outcome.result), command.name)),
                signal_seq=seq,
            )
        else:
            event = ChildFailed(
                id=self._next_id(),
                at=utcnow(),
                seq=command.seq,
                name=command.name,
                child_run_id=command.child_run_id,
                status=outcome.status,
                error=outcome.error,
                reason=outcome.reason,
                signal_seq=seq,
            )
        recorded = await self._append(event)
        assert isinstance(recorded, ChildCompleted | ChildFailed)
        self.state.deliver(recorded)
        await self._flush_records()

    async def _close_children(self, reason: str) -> None:
        """Apply each open child's ``parent_close`` policy as this run closes."""
        for command in self.state.open_children():
            if command.parent_close == "abandon":
                continue
            kind = TERMINATE if command.parent_close == "terminate" else CANCEL
            await send(
                self._conn,
                command.child_run_id,
                kind,
                msgspec.json.encode(f"parent {self.run_id} closed: {reason}"[:_MAX_REASON]),
                f"parent-{self.run_id}",
            )

    async def _guarded_live(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Item]
    ) -> Outcome:
        try:
            return await self._live(tg, receive)
        except _Fenced:
            FENCED.labels(self.workflow.name, "append").inc()
            log.info(
                "run %s: another worker took it over; stepping back",
                self.run_id,
                extra=self._fields(),
            )
            return Outcome.LOST

    async def _live(
        self, tg: anyio.abc.TaskGroup, receive: MemoryObjectReceiveStream[Item]
    ) -> Outcome:
        state = self.state
        assert state.root is not None
        if self._signals_first:  # a cancel sent before this execution must stop it first
            await self._flush_records()
            await self._move_signals()
        while not state.root.done():
            if state.terminated is not None:
                return await self._end(RunTerminated, state.terminated)
            await self._flush_records()
            if state.root.done():  # a child refused at its start ended the workflow
                break
            self._launch(tg)
            state.drop_abandoned_timers()
            if not state.paused:
                self._arm_timers()
            if self._inflight == 0:
                if self._draining:
                    return Outcome.HANDED_BACK
                if state.paused:  # only a resume (or a cancellation) can move it on
                    if not await self._move_signals():
                        return Outcome.SUSPENDED
                    continue
                if not (state.timers or state.waits_for_signals or state.waits_for_children):
                    return await self._fail(
                        ErrorInfo(
                            type="NatflowError",
                            message="the workflow awaits something natflow cannot deliver (only "
                            "ctx calls may be awaited inside a workflow)",
                        )
                    )
                due = self.next_due
                if due is None or (due - utcnow()).total_seconds() > HOLD_TIMERS_UNDER:
                    if await self._move_signals():
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
                    return Outcome.SUSPENDED
            await self._handle(await receive.receive())
        await self._flush_records()
        return await self._finish()

    async def _handle(self, item: Item) -> None:
        if isinstance(item, Finished) and item.retry_at is not None:
            await self._record_retry(item, item.retry_at)
        elif isinstance(item, Finished):
            event = await self._append(self._outcome_event(item))
            self._inflight -= 1
            assert isinstance(event, StepCompleted | StepFailed)
            self._count_step(event)
            self.state.deliver(event)
        elif isinstance(item, StillRunning):
            await self._append(
                StepStarted(
                    id=self._next_id(),
                    at=utcnow(),
                    seq=item.command.seq,
                    name=item.command.name,
                    occurrence=item.command.occurrence,
                    attempt=item.attempt,
                    **rate_fields(item),
                )
            )
        elif isinstance(item, TimerDue):
            await self._fire(item.seq)
        else:
            await self._move_signals()

    async def _fire(self, seq: int) -> None:
        self._armed.pop(seq, None)
        due = self.state.timers.get(seq)
        command = self.state.command(seq)
        if due is None or command is None or self.state.paused:
            return  # a paused run's timers are armed again when it is resumed
        early = (due - utcnow()).total_seconds()
        if early > 0:  # never before its due time
            self._arm(seq, due)
            return
        if isinstance(command, WaitCommand):
            await self._move_signals()  # a signal that arrived in time beats its timeout
            if command.future.done():
                return
        fired = await self._append(
            TimerFired(id=self._next_id(), at=utcnow(), seq=seq, name=command.name)
        )
        assert isinstance(fired, TimerFired)
        self.state.deliver(fired)

    def _arm_timers(self) -> None:
        for seq, due in self.state.timers.items():
            if seq not in self._armed:
                self._arm(seq, due)

    def _arm(self, seq: int, due: datetime) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, (due - utcnow()).total_seconds())
        self._armed[seq] = loop.call_later(delay, self._notify, TimerDue(seq))

    async def _move_signals(self) -> bool:
        """Move the run's new signals into history, in order; True if any arrived."""
        moved = False
        state = self.state
        for msg in await pending_signals(self._conn, self.run_id, state.signal_cursor):
            seq = sequence(msg)
            try:
                signal = parse(msg, seq)
                await self._check_not_before_run(msg, seq, signal.name)
            except BadSignal as bad:
                await self._append(
                    SignalRejected(
                        id=self._next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        name=bad.name,
                        reason=bad.reason,
                    )
                )
                SIGNALS_REJECTED.labels("worker").inc()
                state.signal_cursor = seq
                continue
            state.signal_cursor = seq
            if signal.name == CHILD:
                await self._record_child(seq, signal.payload)
                moved = True
                continue
            if signal.name in (PAUSE, RESUME):
                await self._pause_or_resume(seq, signal.name, signal.payload)
                moved = True
                continue
            if signal.name in CONTROL:
                cancel = await self._append(
                    CancelRequested(
                        id=self._next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        reason=(cancel_reason(signal.payload) or "")[:_MAX_REASON] or None,
                        terminate=signal.name == TERMINATE,
                    )
                )
                assert isinstance(cancel, CancelRequested)
                state.deliver(cancel)
                await self._flush_records()
                moved = True
                continue
            if signal.signal_id and state.knows_signal(signal.signal_id):
                continue  # a duplicate older than the stream's dedupe window
            try:
                event = await self._append(
                    SignalReceived(
                        id=self._next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        name=signal.name,
                        # opened here (sealed again, with the current key, by the append)
                        payload=msgspec.Raw(await self._open(signal.payload, signal.name)),
                        signal_id=signal.signal_id,
                    )
                )
            except PayloadTooLarge as big:  # the stream took it; history cannot
                await self._reject_too_large(seq, signal.name, big)
                continue
            assert isinstance(event, SignalReceived)
            SIGNALS_DELIVERED.labels(self.workflow.name).inc()
            state.deliver(event)
            await self._flush_records()  # what the signal made the workflow do comes next
            moved = True
        return moved

    async def _record_retry(self, item: Finished, retry_at: datetime) -> None:
        """A failed attempt goes into history with the time of the next one, which waits on
        a durable timer like a sleep (the run is let go if it is far off)."""
        cmd = item.command
        assert item.error is not None
        retrying = await self._append(
            StepRetrying(
                id=self._next_id(),
                at=utcnow(),
                seq=cmd.seq,
                name=cmd.name,
                occurrence=cmd.occurrence,
                attempt=item.attempt,
                started_at=item.started_at,
                error=item.error,
                retry_at=retry_at,
            )
        )
        assert isinstance(retrying, StepRetrying)
        self._inflight -= 1
        STEP_RETRIES.labels(self.workflow.name, cmd.name).inc()
        log.warning(
            "run %s: step %r attempt %d failed (%s); attempt %d at %s",
            self.run_id,
            cmd.name,
            item.attempt,
            item.error,
            item.attempt + 1,
            retry_at.isoformat(),
            extra=fields(self.run_id, self.workflow.name, cmd.name, attempt=item.attempt),
        )
        self.state.retrying(retrying)

    async def _reject_too_large(self, seq: int, name: str, big: PayloadTooLarge) -> None:
        reason = (
            f"too large to move into history ({big.size} bytes as an event, over the "
            f"server's max payload of {self._conn.max_payload}); send a reference instead"
        )
        quarantined("signal_too_large", f"signal #{seq} of run {self.run_id}", reason, logger=log)
        await self._append(
            SignalRejected(
                id=self._next_id(), at=utcnow(), signal_seq=seq, name=name, reason=reason
            )
        )
        SIGNALS_REJECTED.labels("worker").inc()

    async def _pause_or_resume(self, seq: int, name: str, payload: bytes) -> None:
        pause = name == PAUSE
        if pause == self.state.paused:
            return  # paused (or running) already: nothing changes
        event: RunPaused | RunResumed = (
            RunPaused(
                id=self._next_id(),
                at=utcnow(),
                signal_seq=seq,
                reason=(cancel_reason(payload) or "")[:_MAX_REASON] or None,
            )
            if pause
            else RunResumed(id=self._next_id(), at=utcnow(), signal_seq=seq)
        )
        await self._append(event)
        self.state.paused = pause
        log.info("run %s %s", self.run_id, "paused" if pause else "resumed", extra=self._fields())

    def _count_step(self, event: StepCompleted | StepFailed) -> None:
        if isinstance(event, StepCompleted):
            labelled(STEPS, self.workflow.name, event.name, "completed").inc()
            return
        labelled(STEPS, self.workflow.name, event.name, "failed").inc()
        log.warning(
            "run %s: step %r failed (attempt %d): %s: %s",
            self.run_id,
            event.name,
            event.attempt,
            event.error.type,
            event.error.message,
            extra=self._fields(event.name),
        )

    def _outcome_event(self, item: Finished) -> StepCompleted | StepFailed:
        cmd = item.command
        common: dict[str, Any] = {
            "id": self._next_id(),
            "at": utcnow(),
            "seq": cmd.seq,
            "name": cmd.name,
            "occurrence": cmd.occurrence,
            "attempt": item.attempt,
            "started_at": item.started_at,
        }
        if item.error is not None:
            return StepFailed(**common, error=self._bounded(item.error))
        assert item.result is not None
        return StepCompleted(**common, result=msgspec.Raw(item.result))

    def _launch(self, tg: anyio.abc.TaskGroup) -> None:
        if self._draining or self.state.paused:
            return  # the next holder (or the resumed run) issues these again
        assert self._send is not None
        for command in self.state.take_launches():
            self._inflight += 1
            tg.start_soon(self._contained_step, command, name=f"step {command.name}")

    async def _contained_step(self, command: StepCommand) -> None:
        """Run a step; a ``BaseException`` from its body (``SystemExit``, ``KeyboardInterrupt``
        or another) becomes the step's recorded failure instead of the worker's exit."""
        assert self._send is not None
        started_at = utcnow()
        try:
            with running_step(self.run_id, command.name):
                await run_step(
                    command,
                    self._send,
                    self._conn,
                    self._runtime,
                    self.run_id,
                    self._trace.traced,
                )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # a real cancellation: let it through
                raise
            self._contain(command, started_at, exc)  # raised by the step's own code
        except BaseException as exc:  # user code (or its error's str()) must not end the worker
            self._contain(command, started_at, exc)

    def _contain(self, command: StepCommand, started_at: datetime, exc: BaseException) -> None:
        """Record what a step's code raised beyond ``Exception`` as the step's failure."""
        assert self._send is not None
        quarantined(
            "user_base_exception",
            f"run {self.run_id} step {command.name!r}",
            f"the step raised {type(exc).__name__}; recorded as its failure",
            logger=log,
        )
        try:
            error = error_info(exc)
        except Exception:  # an exception whose str() raises
            error = ErrorInfo(type=type(exc).__qualname__, message="(the error cannot be shown)")
        self._send.send_nowait(Finished(command, 1, started_at, error=error))

    async def _check_not_before_run(self, msg: Any, seq: int, name: str) -> None:
        """A signal stored before the run existed was dead-lettered ("no run has this id")
        and must not reach a run created under that id later. Both times are the server's."""
        if self._created_at is None:
            self._created_at = await run_stored_at(self._conn, self.run_id, self.state.start)
        if self._created_at is not None and stored_at(msg) < self._created_at:
            raise BadSignal(seq, msg.subject, name, "sent before the run existed")

    async def _end(self, kind: type[RunCancelled] | type[RunTerminated], reason: str) -> Outcome:
        await self._close_children(reason)
        await self._append(kind(id=self._next_id(), at=utcnow(), reason=reason))
        return Outcome.CANCELLED

    async def _finish(self) -> Outcome:
        state = self.state
        assert state.root is not None
        if state.terminated is not None:
            return await self._end(RunTerminated, state.terminated)
        if state.root.cancelled():
            return await self._end(RunCancelled, state.cancelled or "cancelled")
        exc = state.root.exception()
        if isinstance(exc, ContinueAsNew):
            if state.cancelled is not None:  # a cancellation that reached it wins
                return await self._end(RunCancelled, state.cancelled)
            return await self._continue_as_new(exc)
        await self._close_children("it ended")
        if exc is not None:
            return await self._fail(error_info(exc))
        try:
            data = encode_value(f"result of workflow {self.workflow.name!r}", state.root.result())
            check_value_size(self._conn, f"result of run {self.run_id!r}", len(data), to_seal=True)
        except InvalidInput as error:
            return await self._fail(error_info(error))
        await self._append(RunCompleted(id=self._next_id(), at=utcnow(), result=msgspec.Raw(data)))
        return Outcome.COMPLETED

    async def _continue_as_new(self, request: ContinueAsNew) -> Outcome:
        """Start the run's next stretch of history (see ``_continuation``)."""
        await self._close_children("it continued as new")  # or failed, below
        try:
            check_input_size(self._conn, self.run_id, request.input_json)
        except InvalidInput as error:
            return await self._fail(error_info(error))
        event = next_stretch(
            self.state, self.run_id, request.input_json, self._next_id(), self._count
        )
        stored_at = await run_stored_at(self._conn, self.run_id, self.state.start)
        event = msgspec.structs.replace(event, run_stored_at=stored_at)
        await self._append(event, rollup=True)
        log.info(
            "run %s continued as new (stretch %d)", self.run_id, event.stretch, extra=self._fields()
        )
        return Outcome.CONTINUED

    async def _fail(self, error: ErrorInfo) -> Outcome:
        await self._append(RunFailed(id=self._next_id(), at=utcnow(), error=self._bounded(error)))
        return Outcome.FAILED

    def _bounded(self, error: ErrorInfo) -> ErrorInfo:
        """An error short enough to record: a huge message must not make the append fail."""
        # Characters per field; a large error is stored whole by reference (natflow_engine
        # _values), so the cut only guards against the absurd.
        limit = _MAX_ERROR_CHARS
        if len(error.message) <= limit and len(error.traceback) <= limit:
            return error
        cut = "\n[... cut: too long to record ...]\n"
        message, trace = error.message, error.traceback
        return ErrorInfo(
            type=error.type,
            message=message if len(message) <= limit else message[: limit // 2] + cut,
            traceback=trace if len(trace) <= limit else trace[-limit // 2 :],
        )

    def _dispose(self) -> None:
        self._trace.detach()
        for handle in self._armed.values():
            handle.cancel()
        self._armed.clear()
        self.state.close()
