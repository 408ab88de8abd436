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
import hashlib
import logging
import math
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine import (
    ErrorInfo,
    InvalidInput,
    NonDeterminismError,
    RetryPolicy,
    SignalTimeout,
    StepError,
    to_seconds,
)
from engine._codec import decode_value, encode_value, error_info
from engine._connection import Connection
from engine._events import (
    CancelRequested,
    Event,
    PatchMarked,
    RunBlocked,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunStarted,
    RunTerminated,
    SignalReceived,
    SignalRejected,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    TimerScheduled,
    utcnow,
)
from engine._history import AppendConflict, History, HistoryStore
from engine._logs import fields
from engine._metrics import FENCED, SIGNALS_DELIVERED, SIGNALS_REJECTED, STEPS, TAKEOVERS
from engine._names import check_step_name, check_token
from engine._retry import NO_RETRY
from engine._signals import (
    CONTROL,
    TERMINATE,
    BadSignal,
    last_signal_seq,
    parse,
    pending_signals,
    run_created_at,
    sequence,
    stored_at,
)

from ._commands import (
    Command,
    Finished,
    Item,
    SignalsArrived,
    SleepCommand,
    StepCommand,
    StillRunning,
    TimerDue,
    WaitCommand,
    recorded_command,
)
from ._context import WorkflowContext
from ._loop import WorkflowLoop
from ._steps import StepRuntime, return_type, run_step
from ._workflow import Workflow

__all__ = ["Evicted", "Outcome", "RunExecution", "StepRuntime"]

log = logging.getLogger("natflow.worker")

# A timer due sooner than this is waited for while holding the run; a later one lets it go.
HOLD_TIMERS_UNDER = 1.0

Delivered = StepCompleted | StepFailed | TimerFired | SignalReceived | CancelRequested


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    SUSPENDED = "suspended"  # waits for a timer or a signal; the worker lets it go
    LOST = "lost"  # another worker holds the run now; this one steps back
    STALE = "stale"  # a claim without reading history met a newer one: read it and retry
    HANDED_BACK = "handed_back"  # the worker is draining; running steps were recorded
    CANCELLED = "cancelled"  # cancelled (after its cleanup) or terminated


class Evicted(BaseException):
    """Private control flow: the run was dropped from this worker. User code cannot catch it
    with ``except Exception``."""


class _Fenced(Exception):
    """An append met a newer history: this worker no longer holds the run."""


def _seed(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big")


class RunExecution:
    """Replays and continues one run; see the module docstring."""

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
    ) -> None:
        start = history.events[0]
        assert isinstance(start, RunStarted)
        self.workflow = workflow
        self.run_id = history.run_id
        self.seed = _seed(history.run_id)
        self.now: datetime = start.at
        self.replaying = True
        self.block: NonDeterminismError | None = None
        self._start = start
        self._store = store
        self._conn = conn
        self._identity = identity
        self._runtime = runtime
        self._delivery = delivery
        self._optimistic = optimistic  # history was not read: a claim conflict is no verdict
        self._count = len(history.events)
        self._last_seq = history.last_seq
        self._last_event = history.events[-1]
        self._load(history.events)
        self._patch_memo: dict[str, bool] = {}
        self._to_record: list[Event] = []  # appended before anything else happens live
        self._commands: dict[int, Command] = {}
        self._to_launch: list[StepCommand] = []
        self._occurrences: Counter[str] = Counter()
        self._next_seq = 1
        self._inflight = 0
        self._timers: dict[int, datetime] = {}  # pending sleeps and wait timeouts by seq
        self._armed: dict[int, asyncio.TimerHandle] = {}
        self._inbox: defaultdict[str, deque[msgspec.Raw]] = defaultdict(deque)
        self._waiting: defaultdict[str, deque[WaitCommand]] = defaultdict(deque)
        self._evicted = False
        self._draining = False
        self._new_timers: list[int] = []  # recorded by this execution: not in KV yet
        self._created_at: datetime | None = None  # when the server stored run_started
        self.cancelled: str | None = None  # a cancellation reached the workflow
        self.terminated: str | None = None  # stop now, run nothing more
        self._loop = WorkflowLoop()  # type: ignore[abstract]
        self._ctx = WorkflowContext(self)
        self._root: asyncio.Task[Any] | None = None
        self._send: MemoryObjectSendStream[Item] | None = None

    def _load(self, events: list[Event]) -> None:
        self._records: dict[int, str] = {}  # seq -> what history says the command was
        self._recorded_events: dict[int, Event] = {}
        self._replay: deque[Delivered] = deque()
        self._patches: set[str] = set()
        self.signal_cursor = 0
        self._signal_ids: set[str] = set()
        self._last_holder: str | None = None  # the worker of the latest claim
        for event in events:
            if isinstance(event, RunClaimed):
                self._last_holder = event.worker
            recorded = recorded_command(event)
            if recorded is not None:
                self._records[recorded[0]] = recorded[1]
                self._recorded_events[recorded[0]] = event  # a completion outranks a start
            if isinstance(event, Delivered):
                self._replay.append(event)
            if isinstance(event, PatchMarked):
                self._patches.add(event.change_id)
            if isinstance(event, SignalReceived | SignalRejected | CancelRequested):
                self.signal_cursor = max(self.signal_cursor, event.signal_seq)
            if isinstance(event, SignalReceived) and event.signal_id:
                self._signal_ids.add(event.signal_id)

    @property
    def waits_for_signals(self) -> bool:
        return any(self._waiting.values())

    def timers_to_index(self) -> list[tuple[int, str, datetime]]:
        """Pending timers this execution recorded, for the worker to put in KV itself as it
        lets the run go (the engine's dispatcher does too, but later, when it is busy)."""
        return [
            (seq, self._commands[seq].name, self._timers[seq])
            for seq in self._new_timers
            if seq in self._timers
        ]

    @property
    def next_due(self) -> datetime | None:
        """When the earliest pending timer comes due (None if there is none)."""
        return min(self._timers.values(), default=None)

    # -- called by workflow code (on the workflow loop) ------------------------------------

    def _new_seq(self) -> int:
        if self._evicted:
            raise Evicted()
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _match(self, command: Command) -> bool:
        """Check the command against history; True if history already recorded it."""
        self._commands[command.seq] = command
        recorded = self._records.get(command.seq)
        if recorded is not None and recorded != command.describe():
            self._diverged(command.seq, expected=command.describe(), recorded=recorded)
        return recorded is not None

    def issue_step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
    ) -> asyncio.Future[Any]:
        check_step_name(name)
        if not callable(fn):
            raise InvalidInput(f"step {name!r}: {fn!r} is not callable")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"step {name!r}: retry must be a RetryPolicy")
        seconds = None if timeout is None else to_seconds(f"timeout of step {name!r}", timeout)
        seq = self._new_seq()
        self._occurrences[name] += 1
        command = StepCommand(
            seq=seq,
            name=name,
            future=self._loop.create_future(),
            occurrence=self._occurrences[name],
            fn=fn,
            args=args,
            kwargs=kwargs,
            retry=retry or self.workflow.retry or NO_RETRY,
            timeout=seconds,
            result_type=return_type(fn),
            workflow=self.workflow.name,
        )
        self._match(command)
        recorded = self._recorded_events.get(seq)
        if not isinstance(recorded, StepCompleted | StepFailed):
            self._to_launch.append(command)
        return command.future

    def issue_sleep(self, name: str, due_at: datetime) -> asyncio.Future[Any]:
        check_step_name(name)
        seq = self._new_seq()
        command = SleepCommand(seq=seq, name=name, future=self._loop.create_future(), due_at=due_at)
        if self._match(command):
            recorded = self._recorded_events[seq]
            if isinstance(recorded, TimerScheduled):
                command.due_at = recorded.due_at
        else:
            self._to_record.append(
                TimerScheduled(id="", at=utcnow(), seq=seq, name=name, due_at=due_at)
            )
            self._new_timers.append(seq)
        self._timers[seq] = command.due_at
        return command.future

    def issue_wait(self, name: str, timeout: float | None) -> asyncio.Future[Any]:
        check_token("signal name", name)
        seq = self._new_seq()
        future: asyncio.Future[Any] = self._loop.create_future()
        command = WaitCommand(seq=seq, name=name, future=future, timeout_at=None)
        if self._inbox[name]:  # a signal that arrived before the wait: no record needed
            self._commands[seq] = command
            if seq in self._records:
                self._diverged(
                    seq, expected=f"signal {name!r} already received", recorded=self._records[seq]
                )
            future.set_result(self._signal_value(self._inbox[name].popleft()))
            return future
        if self._match(command):
            recorded = self._recorded_events[seq]
            if isinstance(recorded, SignalWaited):
                command.timeout_at = recorded.timeout_at
        else:
            if timeout is not None:
                command.timeout_at = utcnow() + timedelta(seconds=timeout)
            self._to_record.append(
                SignalWaited(id="", at=utcnow(), seq=seq, name=name, timeout_at=command.timeout_at)
            )
        if command.timeout_at is not None:
            self._timers[seq] = command.timeout_at
            if seq not in self._records:
                self._new_timers.append(seq)
        self._waiting[name].append(command)
        return future

    def patched(self, change_id: str) -> bool:
        if self._evicted:
            raise Evicted()
        if change_id not in self._patch_memo:
            if change_id in self._patches:
                value = True
            elif self.replaying:
                value = False
            else:
                value = True
                self._to_record.append(PatchMarked(id="", at=utcnow(), change_id=change_id))
                self._patches.add(change_id)
            self._patch_memo[change_id] = value
        return self._patch_memo[change_id]

    # -- the driver ------------------------------------------------------------------------

    def drain(self) -> None:
        """Start no new step; once running ones are recorded, hand the run back."""
        self._draining = True
        self._notify(SignalsArrived())  # wake the driver if it only waits

    def signals_arrived(self) -> None:
        self._notify(SignalsArrived())

    def _notify(self, item: Item) -> None:
        if self._send is not None:
            self._send.send_nowait(item)

    async def execute(self) -> Outcome:
        """Replay, claim the run, continue live until it ends, waits, or is lost."""
        try:
            self._begin()
            if self.block is not None:
                await self._record_block()
                return Outcome.BLOCKED
            if not await self._has_work():
                return Outcome.SUSPENDED  # a duplicate or stale wake-up: write nothing
            if not await self._claim():
                return Outcome.STALE if self._optimistic else Outcome.LOST
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

    def _begin(self) -> None:
        self._root = self._loop.create_task(self._main(), name=f"workflow {self.run_id}")
        self._tick()
        while self._replay and self.block is None:
            event = self._replay.popleft()
            self.replaying = bool(self._replay)
            self._deliver(event)
            if self._root.done() and self._replay and self.block is None:
                nxt = recorded_command(self._replay[0])
                self._diverged(
                    nxt[0] if nxt else 0, expected=None, recorded=nxt[1] if nxt else "more events"
                )
        self.replaying = False

    async def _main(self) -> Any:
        value: Any = None
        if self.workflow.takes_input:
            value = decode_value(
                f"input of workflow {self.workflow.name!r}",
                self._start.input,
                self.workflow.input_type,
            )
        return await self.workflow(self._ctx, value)

    def _tick(self) -> None:
        self._loop.run_until_idle()

    async def _has_work(self) -> bool:
        """Whether taking the run now would change anything (else no claim is written)."""
        assert self._root is not None
        if self._root.done() or self._to_launch or self._to_record:
            return True
        due = self.next_due
        if due is not None and (due - utcnow()).total_seconds() <= HOLD_TIMERS_UNDER:
            return True
        # A signal for a wait, or a cancellation for any waiting run.
        return await last_signal_seq(self._conn, self.run_id) > self.signal_cursor

    def _diverged(self, position: int, *, expected: str | None, recorded: str | None) -> None:
        if self.block is None:
            self.block = NonDeterminismError(self.run_id, position, expected, recorded)

    # -- delivering outcomes to the workflow ------------------------------------------------

    def _deliver(self, event: Delivered) -> None:
        """Hand one outcome to the workflow and let it run until it waits again."""
        self.now = event.at
        if isinstance(event, SignalReceived):
            self._deliver_signal(event)
        elif isinstance(event, CancelRequested):
            self._deliver_cancel(event)
        else:
            command = self._commands.get(event.seq)
            if command is None:
                self._diverged(
                    event.seq,
                    expected=None,
                    recorded=self._records.get(event.seq, f"event {event.seq}"),
                )
                return
            if isinstance(event, TimerFired):
                self._deliver_timer(command)
            else:
                assert isinstance(command, StepCommand)
                self._resolve_step(command, event)
        self._tick()

    def _resolve_step(self, command: StepCommand, event: StepCompleted | StepFailed) -> None:
        if command.future.done():
            return
        if isinstance(event, StepFailed):
            command.future.set_exception(StepError(command.name, event.error))
            return
        try:
            value = decode_value(
                f"result of step {command.name!r}", event.result, command.result_type
            )
        except InvalidInput:
            value = msgspec.json.decode(event.result)
        command.future.set_result(value)

    def _deliver_timer(self, command: Command) -> None:
        self._timers.pop(command.seq, None)
        if command.future.done():
            return
        if isinstance(command, WaitCommand):
            self._waiting[command.name].remove(command)
            command.future.set_exception(SignalTimeout(command.name))
        else:
            command.future.set_result(None)

    def _deliver_cancel(self, event: CancelRequested) -> None:
        assert self._root is not None
        if event.terminate:
            self.terminated = event.reason or "terminated"
            return
        # CancelledError at the workflow's current await: its finally blocks (and any
        # cleanup steps in them) run, and replay cancels at the same point of history.
        self.cancelled = event.reason or "cancelled"
        self._root.cancel()

    def _deliver_signal(self, event: SignalReceived) -> None:
        waiting = self._waiting[event.name]
        while waiting and waiting[0].future.done():  # a wait abandoned by a cancellation
            waiting.popleft()
        if not waiting:
            self._inbox[event.name].append(event.payload)
            return
        command = waiting.popleft()
        self._timers.pop(command.seq, None)
        command.future.set_result(self._signal_value(event.payload))

    @staticmethod
    def _signal_value(payload: msgspec.Raw) -> Any:
        return msgspec.json.decode(payload)

    # -- appending -------------------------------------------------------------------------

    async def _append(self, event: Event) -> Event:
        event = (
            msgspec.structs.replace(event, id=f"{self.run_id}:{self._count + 1}")
            if not event.id
            else event
        )
        try:
            self._last_seq = await self._store.append(self.run_id, event, self._last_seq)
        except AppendConflict as exc:
            raise _Fenced() from exc
        self._count += 1
        self._last_event = event
        return event

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
        if self._delivery > 1 and self._last_holder not in (None, self._identity):
            TAKEOVERS.labels(self._start.queue, "redelivered").inc()
            log.info(
                "run %s: taken over from worker %s (delivery %d)",
                self.run_id,
                self._last_holder,
                self._delivery,
                extra=self._fields(),
            )
        return True

    async def _record_block(self) -> None:
        assert self.block is not None
        info = ErrorInfo(type="NonDeterminismError", message=str(self.block))
        last = self._last_event
        if isinstance(last, RunBlocked) and last.error.message == info.message:
            return
        log.error("%s", self.block, extra=self._fields())
        try:
            await self._append(
                RunBlocked(
                    id=self._next_id(), at=utcnow(), position=self.block.position, error=info
                )
            )
        except _Fenced:
            log.info("run %s changed while being blocked; it will be retried", self.run_id)

    async def _flush_records(self) -> None:
        while self._to_record:
            await self._append(self._to_record.pop(0))

    # -- live ------------------------------------------------------------------------------

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
        assert self._root is not None
        while not self._root.done():
            if self.terminated is not None:
                return await self._end(RunTerminated, self.terminated)
            await self._flush_records()
            self._launch(tg)
            self._drop_abandoned_timers()
            self._arm_timers()
            if self._inflight == 0:
                if self._draining:
                    return Outcome.HANDED_BACK
                if not self._timers and not any(self._waiting.values()):
                    return await self._fail(
                        ErrorInfo(
                            type="NatflowError",
                            message="the workflow awaits something natflow cannot deliver (only "
                            "ctx calls may be awaited inside a workflow)",
                        )
                    )
                due = self.next_due
                if due is None or (due - utcnow()).total_seconds() > HOLD_TIMERS_UNDER:
                    if not await self._move_signals():
                        return Outcome.SUSPENDED
                    continue
            await self._handle(await receive.receive())
        await self._flush_records()
        return await self._finish()

    async def _handle(self, item: Item) -> None:
        if isinstance(item, Finished):
            event = await self._append(self._outcome_event(item))
            self._inflight -= 1
            assert isinstance(event, StepCompleted | StepFailed)
            self._count_step(event)
            self._deliver(event)
        elif isinstance(item, StillRunning):
            await self._append(
                StepStarted(
                    id=self._next_id(),
                    at=utcnow(),
                    seq=item.command.seq,
                    name=item.command.name,
                    occurrence=item.command.occurrence,
                    attempt=item.attempt,
                )
            )
        elif isinstance(item, TimerDue):
            await self._fire(item.seq)
        else:
            await self._move_signals()

    async def _fire(self, seq: int) -> None:
        self._armed.pop(seq, None)
        due = self._timers.get(seq)
        command = self._commands.get(seq)
        if due is None or command is None:
            return
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
        self._deliver(fired)

    def _arm_timers(self) -> None:
        for seq, due in self._timers.items():
            if seq not in self._armed:
                self._arm(seq, due)

    def _arm(self, seq: int, due: datetime) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, (due - utcnow()).total_seconds())
        self._armed[seq] = loop.call_later(delay, self._notify, TimerDue(seq))

    async def _move_signals(self) -> bool:
        """Move the run's new signals into history, in order; True if any arrived."""
        moved = False
        for msg in await pending_signals(self._conn, self.run_id, self.signal_cursor):
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
                self.signal_cursor = seq
                continue
            self.signal_cursor = seq
            if signal.name in CONTROL:
                cancel = await self._append(
                    CancelRequested(
                        id=self._next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        reason=self._reason(signal.payload),
                        terminate=signal.name == TERMINATE,
                    )
                )
                assert isinstance(cancel, CancelRequested)
                self._deliver(cancel)
                await self._flush_records()
                moved = True
                continue
            if signal.signal_id and signal.signal_id in self._signal_ids:
                continue  # a duplicate older than the stream's dedupe window
            event = await self._append(
                SignalReceived(
                    id=self._next_id(),
                    at=utcnow(),
                    signal_seq=seq,
                    name=signal.name,
                    payload=msgspec.Raw(signal.payload),
                    signal_id=signal.signal_id,
                )
            )
            assert isinstance(event, SignalReceived)
            SIGNALS_DELIVERED.labels(self.workflow.name).inc()
            if signal.signal_id:
                self._signal_ids.add(signal.signal_id)
            self._deliver(event)
            await self._flush_records()  # what the signal made the workflow do comes next
            moved = True
        return moved

    def _count_step(self, event: StepCompleted | StepFailed) -> None:
        if isinstance(event, StepCompleted):
            STEPS.labels(self.workflow.name, event.name, "completed").inc()
            return
        STEPS.labels(self.workflow.name, event.name, "failed").inc()
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
        if item.error is not None:
            return StepFailed(
                id=self._next_id(),
                at=utcnow(),
                seq=cmd.seq,
                name=cmd.name,
                occurrence=cmd.occurrence,
                attempt=item.attempt,
                started_at=item.started_at,
                error=item.error,
            )
        assert item.result is not None
        return StepCompleted(
            id=self._next_id(),
            at=utcnow(),
            seq=cmd.seq,
            name=cmd.name,
            occurrence=cmd.occurrence,
            attempt=item.attempt,
            started_at=item.started_at,
            result=msgspec.Raw(item.result),
        )

    def _launch(self, tg: anyio.abc.TaskGroup) -> None:
        if self._draining:
            return  # the next holder replays and issues these again
        assert self._send is not None
        launch, self._to_launch = self._to_launch, []
        for command in launch:
            self._inflight += 1
            tg.start_soon(
                run_step,
                command,
                self._send,
                self._conn,
                self._runtime,
                self.run_id,
                name=f"step {command.name}",
            )

    async def _check_not_before_run(self, msg: Any, seq: int, name: str) -> None:
        """A signal stored before the run existed was dead-lettered ("no run has this id")
        and must not reach a run created under that id later. Both times are the server's."""
        if self._created_at is None:
            self._created_at = await run_created_at(self._conn, self.run_id)
        if self._created_at is not None and stored_at(msg) < self._created_at:
            raise BadSignal(seq, msg.subject, name, "sent before the run existed")

    @staticmethod
    def _reason(payload: bytes) -> str | None:
        value = msgspec.json.decode(payload)
        return value if isinstance(value, str) else None

    def _drop_abandoned_timers(self) -> None:
        """Timers of sleeps and waits a cancellation abandoned keep nobody waiting."""
        for seq in [s for s in self._timers if self._commands[s].future.done()]:
            del self._timers[seq]

    async def _end(self, kind: type[RunCancelled] | type[RunTerminated], reason: str) -> Outcome:
        await self._append(kind(id=self._next_id(), at=utcnow(), reason=reason))
        return Outcome.CANCELLED

    async def _finish(self) -> Outcome:
        assert self._root is not None
        if self.terminated is not None:
            return await self._end(RunTerminated, self.terminated)
        if self._root.cancelled():
            return await self._end(RunCancelled, self.cancelled or "cancelled")
        exc = self._root.exception()
        if exc is not None:
            return await self._fail(error_info(exc))
        try:
            data = encode_value(f"result of workflow {self.workflow.name!r}", self._root.result())
            self._conn.check_size(f"result of run {self.run_id!r}", len(data))
        except InvalidInput as error:
            return await self._fail(error_info(error))
        await self._append(RunCompleted(id=self._next_id(), at=utcnow(), result=msgspec.Raw(data)))
        return Outcome.COMPLETED

    async def _fail(self, error: ErrorInfo) -> Outcome:
        await self._append(RunFailed(id=self._next_id(), at=utcnow(), error=error))
        return Outcome.FAILED

    # -- teardown --------------------------------------------------------------------------

    def _dispose(self) -> None:
        """Close the workflow's coroutines; any ctx call they make now raises Evicted."""
        self._evicted = True
        for handle in self._armed.values():
            handle.cancel()
        self._armed.clear()
        for task in list(self._loop.tasks):
            task.cancel()
        try:
            self._loop.run_until_idle()
        except BaseException:  # user finally-blocks during teardown: nothing left to protect
            log.debug("run %s: error while closing workflow code", self.run_id, exc_info=True)
        self._loop.close()
