"""A run's workflow code and what its history says: commands, replay, delivery.

:class:`WorkflowState` owns the workflow's deterministic loop and the bookkeeping that every
replay must reproduce: each ``ctx`` call becomes a command at the next position, matched
against what history recorded (a mismatch is a divergence), and recorded outcomes are
delivered one at a time in history order. It does no I/O. Two drivers use it:
:class:`~natflow._execution.RunExecution` composes it with the live half (appends, steps,
timers, signals), and :class:`~natflow.testing.Replayer` replays stored histories against
today's code.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, NoReturn

import msgspec
from natflow_engine import (
    NO_RETRY,
    UNDECODABLE,
    History,
    InvalidInput,
    NonDeterminismError,
    RateLimit,
    RetryPolicy,
    RunCancelled,
    RunFailed,
    SignalTimeout,
    check_step_name,
    check_token,
    decode_value,
    derived_run_id,
    retrying_text,
    sleeping_text,
    to_seconds,
    waiting_text,
)
from natflow_engine.events import (
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    PatchMarked,
    RunClaimed,
    RunContinued,
    RunPaused,
    RunResumed,
    RunStarted,
    SignalReceived,
    SignalRejected,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepRetrying,
    TimerFired,
    TimerScheduled,
    utcnow,
)

from ._commands import (
    ChildCommand,
    Command,
    SleepCommand,
    StepCommand,
    WaitCommand,
    recorded_command,
)
from ._context import WorkflowContext
from ._continuation import SUGGESTED_AFTER_COMMANDS, ContinueAsNew, new_input
from ._flow import debounced_input
from ._loop import WorkflowLoop
from ._step_failure import step_failure
from ._steps import return_type
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


Delivered = (
    StepCompleted
    | StepFailed
    | TimerFired
    | SignalReceived
    | CancelRequested
    | ChildCompleted
    | ChildFailed
)
# Delivered events that answer no command of the workflow (see WorkflowState._ended_before).
_UNASKED = (SignalReceived, CancelRequested)


class Evicted(BaseException):
    """Private control flow: the run was dropped from this worker. User code cannot catch it
    with ``except Exception``."""


def _shown(exc: BaseException) -> str:
    try:
        return str(exc)[:500]
    except Exception:  # its own __str__ raised
        return "(its message cannot be shown)"


def _seed(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big")


class WorkflowState:
    """One run's workflow code, replayed from and kept in step with its history."""

    @functools.cached_property
    def seed(self) -> int:
        """The run's random seed (from its id, and its stretch where the stretch says so:
        each stretch draws anew), made when first asked for: few workflows do."""
        start = self.start
        if isinstance(start, RunContinued) and start.reseeded:
            return _seed(f"{self.run_id}#{start.stretch}")
        return _seed(self.run_id)

    def __init__(self, workflow: Workflow, history: History) -> None:
        start = history.events[0]
        assert isinstance(start, RunStarted)
        self.workflow = workflow
        self.run_id = history.run_id
        self.now: datetime = start.at
        self.block: NonDeterminismError | None = None
        self.block_cause: BaseException | None = None  # what the code raised, if that blocked
        self.start = start
        self._load(history.events)
        self._patch_memo: dict[str, bool] = {}
        # Replay is over once the workflow has been handed every recorded outcome, has asked
        # again for every recorded command and patch, or asks for a command beyond them.
        self._last_recorded_seq = max(self._records, default=self.base_seq)
        self._unasked_patches = set(self._patches)
        self._live = False
        self._to_record: list[Event] = []  # appended before anything else happens live
        self._to_stop: list[ChildCommand] = []  # children the workflow stopped waiting for
        self._commands: dict[int, Command] = {}
        self._to_launch: list[StepCommand] = []
        self._children: dict[str, ChildCommand] = {}  # by child run id, outcome not delivered
        self._occurrences: Counter[str] = Counter()
        self._next_seq = self.base_seq + 1  # after an older stretch's commands (continue-as-new)
        self._timers: dict[int, datetime] = {}  # pending sleeps and wait timeouts by seq
        self._inbox: defaultdict[str, deque[SignalReceived]] = defaultdict(deque)
        self._waiting: defaultdict[str, deque[WaitCommand]] = defaultdict(deque)
        self._evicted = False
        self._new_timers: list[int] = []  # recorded by this execution: not in KV yet
        self.cancelled: str | None = None  # a cancellation reached the workflow
        self.terminated: str | None = None  # stop now, run nothing more
        self._loop = WorkflowLoop()  # type: ignore[abstract]
        self._ctx: WorkflowContext | None = WorkflowContext(self)
        self.root: asyncio.Task[Any] | None = None

    def _load(self, events: list[Event]) -> None:
        self._records: dict[int, str] = {}  # seq -> what history says the command was
        self._recorded_events: dict[int, Event] = {}
        self._replay: deque[Delivered] = deque()
        self._patches: set[str] = set()
        self._patch_after: dict[str, int] = {}  # change id -> last command recorded before it
        self.signal_cursor = 0
        # In the order they arrived: a continuation carries the most recent ones on.
        self._signal_ids: dict[str, None] = {}
        self.last_holder: str | None = None  # the worker of the latest claim
        self._retries: dict[int, StepRetrying] = {}  # a step's latest failed attempt
        self._retry_fired: set[int] = set()  # steps whose next attempt came due
        self._child_done: set[int] = set()  # children whose outcome history holds
        self.paused = False  # client.pause: start no step and fire no timer until resumed
        self.base_seq = 0  # commands of older stretches (continue-as-new) end here
        start = events[0]
        if isinstance(start, RunContinued):  # what the older stretch handed on
            self.base_seq = start.base_seq
            self.signal_cursor = start.signal_cursor
            self._signal_ids.update(dict.fromkeys(start.signal_ids))
            self.paused = start.paused
            self._replay.extend(start.signals)  # moved in, not yet taken: delivered first
        for event in events:
            if type(event) is StepCompleted:  # most of a long history; nothing below applies
                self._records[event.seq] = f"step {event.name!r}"  # as recorded_command says
                self._recorded_events[event.seq] = event
                self._replay.append(event)
                continue
            if isinstance(event, RunClaimed):
                self.last_holder = event.worker
            recorded = recorded_command(event)
            if recorded is not None:
                self._records[recorded[0]] = recorded[1]
                self._recorded_events[recorded[0]] = event  # a completion outranks a start
            if isinstance(event, StepRetrying):
                self._retries[event.seq] = event
                self._retry_fired.discard(event.seq)
            elif isinstance(event, TimerFired) and event.seq in self._retries:
                self._retry_fired.add(event.seq)  # starts an attempt; the workflow sees nothing
            elif isinstance(event, Delivered):
                self._replay.append(event)
            if isinstance(event, PatchMarked):
                self._patches.add(event.change_id)
                # Where the code asked for it: after the commands recorded before it.
                self._patch_after.setdefault(event.change_id, max(self._records, default=0))
            if isinstance(event, ChildCompleted | ChildFailed):
                self._child_done.add(event.seq)
                self.signal_cursor = max(self.signal_cursor, event.signal_seq)
            if isinstance(event, RunPaused | RunResumed):
                self.paused = isinstance(event, RunPaused)
            if isinstance(
                event, SignalReceived | SignalRejected | CancelRequested | RunPaused | RunResumed
            ):
                self.signal_cursor = max(self.signal_cursor, event.signal_seq)
            if isinstance(event, SignalReceived) and event.signal_id:
                self._signal_ids[event.signal_id] = None

    @property
    def replaying(self) -> bool:
        """True until the workflow reaches the end of its recorded history.

        That end is the last thing history recorded, whatever its kind: an outcome still to
        hand back, a command (step, sleep, signal wait) not yet asked for again, or a patch
        marker not yet asked for. Code before it ran already; its log lines are not repeated.
        """
        if self._evicted:  # teardown (see close): what runs now is not the run going on
            return True
        if self._live:
            return False
        if self._replay or self._next_seq <= self._last_recorded_seq:
            return True
        if self._unasked_patches:
            # A marker the code has not asked for again, where it still may: at the point
            # the marker was recorded. Once the code issued a command past that point it
            # never will (the ``patched()`` call was removed with the change it guarded):
            # forgotten, or the run would be "replaying" for good (no log line, and a new
            # change id seen live read as an old run's).
            issued = self._next_seq - 1
            self._unasked_patches = {
                c for c in self._unasked_patches if self._patch_after[c] >= issued
            }
            if self._unasked_patches:
                return True
        self._live = True
        return False

    @property
    def workflow_name(self) -> str:
        return self.workflow.name

    @property
    def timers(self) -> Mapping[int, datetime]:
        """Pending sleeps and wait timeouts (and their due times) by command position."""
        return self._timers

    @property
    def has_commands(self) -> bool:
        """Whether the workflow ended or asked for something history does not hold yet."""
        assert self.root is not None
        if self.root.done() or self._to_record:
            return True
        return bool(self._to_launch) and not self.paused  # a paused run launches nothing

    @property
    def has_launches(self) -> bool:
        """Whether a step would start as soon as the run is taken."""
        return not self.paused and any(not c.future.done() for c in self._to_launch)

    def command(self, seq: int) -> Command | None:
        return self._commands.get(seq)

    def take_records(self) -> list[Event]:
        """Events the workflow's new commands need in history, oldest first (now owed)."""
        records, self._to_record = self._to_record, []
        return records

    def take_children_to_stop(self) -> list[ChildCommand]:
        """Open children whose awaiting the workflow cancelled, live (each once)."""
        stop, self._to_stop = self._to_stop, []
        return stop

    def _child_let_go(self, command: ChildCommand, future: asyncio.Future[Any]) -> None:
        # A cancelled wait for a child (its task cancelled in the workflow): the child gets
        # its parent_close policy now, not when the parent closes (an abandon policy, never).
        # Only live: a replay meets the same cancellation that was acted on then; a crash in
        # between leaves it to the parent's close, which applies the policy to open children.
        if not future.cancelled() or self._evicted or self.replaying:
            return
        if command.seq not in self._child_done:
            self._to_stop.append(command)

    def take_launches(self) -> list[StepCommand]:
        """Steps to run for real: issued, with no outcome in history."""
        launches, self._to_launch = self._to_launch, []
        return [c for c in launches if not c.future.done()]  # a cancel abandoned the rest

    def knows_signal(self, signal_id: str) -> bool:
        """Whether history already holds a signal with this id (a late duplicate)."""
        return signal_id in self._signal_ids

    @property
    def waits_for_signals(self) -> bool:
        return any(self._waiting.values())

    def waiting_as(self) -> tuple[str, str, datetime | None] | None:
        """What the run waits for, as ``describe()`` says it (status, current, due time):
        its earliest pending sleep, signal wait or step retry; None for none of them."""
        pending: dict[int, tuple[str, str, datetime | None]] = {}
        for waits in self._waiting.values():
            for wait in waits:
                if not wait.future.done():
                    text = waiting_text(wait.name, wait.timeout_at)
                    pending[wait.seq] = ("waiting", text, wait.timeout_at)
        for seq, due in self._timers.items():
            command = self._commands.get(seq)
            if seq in pending or command is None or command.future.done():
                continue
            retry = self._retries.get(seq)
            if retry is not None:
                pending[seq] = ("sleeping", retrying_text(retry), due)
            elif isinstance(command, SleepCommand):
                pending[seq] = ("sleeping", sleeping_text(due), due)
        return pending[min(pending)] if pending else None

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
        """When the earliest pending timer comes due (None if there is none, or while the run
        is paused: its timers fire once it is resumed)."""
        if self.paused:
            return None
        return min(self._timers.values(), default=None)

    def _new_seq(self) -> int:
        if self._evicted:
            raise Evicted()
        seq = self._next_seq
        self._next_seq += 1
        if seq > self._last_recorded_seq and not self._replay:
            self._live = True  # a command history never saw: past its end, whatever is left
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
        rate: tuple[RateLimit, str | None] | None = None,
    ) -> asyncio.Future[Any]:
        check_step_name(name)
        if not callable(fn):
            raise InvalidInput(f"step {name!r}: {fn!r} is not callable")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"step {name!r}: retry must be a RetryPolicy")
        seconds = None if timeout is None else to_seconds(f"timeout of step {name!r}", timeout)
        seq = self._new_seq()
        self._occurrences[name] += 1
        recorded = self._recorded_events.get(seq)
        if (
            isinstance(recorded, StepCompleted | StepFailed)
            and recorded.name == name
            and self._replay
            and self._replay[0] is recorded
            and self.block is None
            and self._alone()
        ):
            # A sequential replay's step (most of a long history): its outcome is the next
            # event to deliver and nothing else could run before it, so it resolves now, as
            # delivery would after an idle tick (no loop turn per step). No command is kept:
            # nothing is ever delivered to it again, and a replay of 10,000 steps builds none.
            self._replay.popleft()
            self.now = recorded.at
            done = self._loop.create_future()
            if isinstance(recorded, StepFailed):
                done.set_exception(step_failure(name, recorded, seconds))
            else:
                done.set_result(_result(recorded.result, return_type(fn)))
            return done
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
            rate=rate,
        )
        self._match(command)
        if isinstance(recorded, StepCompleted | StepFailed):
            return command.future  # its outcome is delivered in history order
        failed = self._retries.get(seq)
        if failed is not None:
            command.attempt = failed.attempt + 1
            if seq not in self._retry_fired:  # still backing off: a durable timer
                self._timers[seq] = failed.retry_at
                return command.future
        self._to_launch.append(command)
        return command.future

    def _alone(self) -> bool:
        """Whether the workflow's only task is the one running, with no callback waiting to
        run: then the loop would be idle as soon as this task awaits, and the next event's
        delivery would wake only it."""
        loop = self._loop
        return len(loop.tasks) == 1 and not loop.has_ready()

    def issue_child(
        self,
        name: str,
        input_json: bytes,
        run_id: str | None,
        queue: str,
        parent_close: str,
        result_type: Any,
    ) -> asyncio.Future[Any]:
        if parent_close not in ("cancel", "terminate", "abandon"):
            raise InvalidInput(
                f"child {name!r}: parent_close must be 'cancel', 'terminate' or 'abandon', "
                f"not {parent_close!r}"
            )
        seq = self._new_seq()
        command = ChildCommand(
            seq=seq,
            name=name,
            future=self._loop.create_future(),
            child_run_id=run_id or derived_run_id(self.run_id, f"-c{seq}"),
            queue=queue,
            parent_close=parent_close,
            input_json=input_json,
            result_type=result_type,
        )
        if self._match(command):
            recorded = self._recorded_events[seq]
            if isinstance(recorded, ChildCompleted | ChildFailed):
                return command.future  # its outcome is delivered in history order
            if isinstance(recorded, ChildStarted):
                command.child_run_id = recorded.child_run_id
                command.parent_close = recorded.parent_close
        else:
            self._to_record.append(
                ChildStarted(
                    id="",
                    at=utcnow(),
                    seq=seq,
                    name=name,
                    child_run_id=command.child_run_id,
                    queue=queue,
                    parent_close=parent_close,
                )
            )
        self._children[command.child_run_id] = command
        command.future.add_done_callback(functools.partial(self._child_let_go, command))
        return command.future

    @property
    def waits_for_children(self) -> bool:
        return any(not c.future.done() for c in self._children.values())

    def open_child(self, child_run_id: str) -> ChildCommand | None:
        """The open child command of that child run (None if unknown or already resolved)."""
        command = self._children.get(child_run_id)
        return command if command is not None and command.seq not in self._child_done else None

    def open_children(self) -> list[ChildCommand]:
        """Children started by this run whose outcome history does not hold."""
        return [c for c in self._children.values() if c.seq not in self._child_done]

    def retrying(self, event: StepRetrying) -> None:
        """A live attempt failed and was recorded: the next one waits for its timer."""
        command = self._commands[event.seq]
        assert isinstance(command, StepCommand)
        command.attempt = event.attempt + 1
        self._timers[event.seq] = event.retry_at
        self._new_timers.append(event.seq)

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
            future.set_result(self._signal_value(self._inbox[name].popleft().payload))
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

    @property
    def last_seq_used(self) -> int:
        """The position of the last command issued (or of an older stretch's last)."""
        return self._next_seq - 1

    @property
    def continue_as_new_suggested(self) -> bool:
        """Whether this stretch has issued enough commands to be worth continuing as new
        (a count of commands, so every replay answers alike at the same point)."""
        return self._next_seq - 1 - self.base_seq >= SUGGESTED_AFTER_COMMANDS

    def continue_as_new(self, value: Any) -> NoReturn:
        if self._evicted:
            raise Evicted()
        raise ContinueAsNew(new_input(self.workflow, value))

    def unconsumed_signals(self) -> list[SignalReceived]:
        """Signals history holds that no wait of the workflow has taken yet."""
        return [signal for queue in self._inbox.values() for signal in queue]

    def recent_signal_ids(self, limit: int) -> list[str]:
        return list(self._signal_ids)[-limit:]

    def patched(self, change_id: str) -> bool:
        if self._evicted:
            raise Evicted()
        if change_id not in self._patch_memo:
            if change_id in self._patches:
                value = True
                self._unasked_patches.discard(change_id)
            elif self.replaying:
                value = False
            else:
                value = True
                self._to_record.append(PatchMarked(id="", at=utcnow(), change_id=change_id))
                self._patches.add(change_id)
            self._patch_memo[change_id] = value
        return self._patch_memo[change_id]

    def begin(self) -> None:
        """Start the workflow and hand it every recorded outcome, in history order."""
        self.root = self._loop.create_task(self._main(), name=f"workflow {self.run_id}")
        self._tick()
        while self._replay and self.block is None:
            event = self._replay.popleft()
            self.deliver(event)
            if self.root.done() and self.block is None:
                self._ended_before(self._replay)
        unreached = [seq for seq in self._records if seq >= self._next_seq]
        if self.root.done() and unreached and self.block is None:
            first = min(unreached)
            self._diverged(first, expected=None, recorded=self._records[first])

    def _ended_before(self, rest: deque[Delivered]) -> None:
        """The workflow returned (or raised) with ``rest`` still to deliver: a divergence if
        any of it answers a command. Signals and cancel requests answer none: taken in after
        the workflow's last wait (a continued run's carried signals, those taken in while it
        was paused), they are kept in the inbox, as live, and carried on by a continuation."""
        answering = next((e for e in rest if not isinstance(e, _UNASKED)), None)
        if answering is None:
            return
        nxt = recorded_command(answering)
        self._diverged(
            nxt[0] if nxt else 0, expected=None, recorded=nxt[1] if nxt else "more events"
        )

    def _ended_early(self) -> str | None:
        """What the workflow did instead of asking for more: what it raised, if it did
        (else "nothing more"), so that a block names the error, not a step thought removed."""
        assert self.root is not None
        exc = None if self.root.cancelled() else self.root.exception()
        if exc is None:
            return None
        self.block_cause = exc
        return f"nothing more: it raised {type(exc).__name__}: {_shown(exc)}"

    async def _main(self) -> Any:
        ctx = self._ctx
        assert ctx is not None  # closed states run no workflow code
        value: Any = None
        data: bytes | msgspec.Raw = self.start.input
        if self.start.debounce is not None:  # the last input of its window: a recorded step
            data = await debounced_input(ctx, self.start)
        if self.workflow.takes_input:
            value = decode_value(
                f"input of workflow {self.workflow.name!r}", data, self.workflow.input_type
            )
        return await self.workflow(ctx, value)

    def _tick(self) -> None:
        self._loop.run_until_idle()

    def _diverged(self, position: int, *, expected: str | None, recorded: str | None) -> None:
        if expected is None and self.root is not None and self.root.done():
            expected = self._ended_early()  # it asks for nothing more: because it raised?
        if self.block is None:
            self.block = NonDeterminismError(self.run_id, position, expected, recorded)

    def deliver(self, event: Delivered) -> None:
        """Hand one outcome to the workflow and let it run until it waits again."""
        self.now = event.at
        if type(event) is StepCompleted:  # the common case first (a long replay is mostly this)
            command = self._commands.get(event.seq)
            if isinstance(command, StepCommand):
                self._resolve_step(command, event)
                self._tick()
                return
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
            elif isinstance(event, ChildCompleted | ChildFailed):
                assert isinstance(command, ChildCommand)
                self._resolve_child(command, event)
            else:
                assert isinstance(command, StepCommand)
                self._resolve_step(command, event)
        self._tick()

    def _resolve_step(self, command: StepCommand, event: StepCompleted | StepFailed) -> None:
        if command.future.done():
            return
        if isinstance(event, StepFailed):
            command.future.set_exception(step_failure(command.name, event, command.timeout))
            return
        command.future.set_result(_result(event.result, command.result_type))

    def _resolve_child(self, command: ChildCommand, event: ChildCompleted | ChildFailed) -> None:
        self._child_done.add(event.seq)
        if command.future.done():
            return
        if isinstance(event, ChildFailed):
            if event.status == "failed" and event.error is not None:
                command.future.set_exception(RunFailed(event.child_run_id, event.error))
            else:
                command.future.set_exception(RunCancelled(event.child_run_id, event.reason))
            return
        command.future.set_result(_result(event.result, command.result_type))

    def _deliver_timer(self, command: Command) -> None:
        self._timers.pop(command.seq, None)
        if command.future.done():
            return
        if isinstance(command, StepCommand):  # its next attempt is due
            command.issued_at = time.monotonic()
            self._to_launch.append(command)
        elif isinstance(command, WaitCommand):
            self._waiting[command.name].remove(command)
            command.future.set_exception(SignalTimeout(command.name))
        else:
            command.future.set_result(None)

    def _deliver_cancel(self, event: CancelRequested) -> None:
        assert self.root is not None
        if event.terminate:
            self.terminated = event.reason or "terminated"
            return
        # CancelledError at the workflow's current await: its finally blocks (and any
        # cleanup steps in them) run, and replay cancels at the same point of history.
        # Once: a second cancel (sent twice, clicked twice) cut the first one's cleanup
        # short. Terminate is the way to stop a run at once.
        if self.cancelled is not None:
            return
        self.cancelled = event.reason or "cancelled"
        self.root.cancel()

    def _deliver_signal(self, event: SignalReceived) -> None:
        if event.signal_id:
            self._signal_ids[event.signal_id] = None
        waiting = self._waiting[event.name]
        while waiting and waiting[0].future.done():  # a wait abandoned by a cancellation
            waiting.popleft()
        if not waiting:
            self._inbox[event.name].append(event)
            return
        command = waiting.popleft()
        self._timers.pop(command.seq, None)
        command.future.set_result(self._signal_value(event.payload))

    @staticmethod
    def _signal_value(payload: msgspec.Raw) -> Any:
        return msgspec.json.decode(payload)

    def drop_abandoned_timers(self) -> None:
        """Timers of sleeps and waits a cancellation abandoned keep nobody waiting."""
        for seq in [s for s in self._timers if self._commands[s].future.done()]:
            del self._timers[seq]

    def close(self) -> None:
        """Close the workflow's coroutines; any ctx call they make now raises Evicted.

        Each wait of the workflow (a step, sleep, signal or child) ends with Evicted, not a
        cancellation: the run was let go of by this worker (it sleeps, another worker took
        it, the worker stops), not cancelled, so an ``except asyncio.CancelledError`` meant
        for a cancel must not run (it did, and its log lines read as live). ``finally``
        blocks still run, as Python runs them for any exception; their ctx calls raise
        Evicted. Only what waits on something else (an asyncio primitive) is cancelled."""
        self._evicted = True
        for command in self._commands.values():
            if not command.future.done():
                command.future.set_exception(Evicted())
        try:
            self._loop.run_until_idle()
            for task in list(self._loop.tasks):
                task.cancel()
            self._loop.run_until_idle()
        except BaseException:  # user finally-blocks during teardown: nothing left to protect
            log.debug("run %s: error while closing workflow code", self.run_id, exc_info=True)
        done: list[asyncio.Future[Any]] = [*self._loop.tasks]
        done += [self.root] if self.root is not None else []
        done += [command.future for command in self._commands.values()]
        for future in done:
            if future.done() and not future.cancelled():
                # Retrieved (asyncio would log "never retrieved" for each), and its
                # traceback dropped: its frames hold the workflow's, which hold this state,
                # a cycle only the collector would free.
                exc = future.exception()
                if isinstance(exc, Evicted):
                    exc.__traceback__ = None
        self._loop.close()
        # The context holds this state, and so do the frames the root task's cancellation
        # keeps: letting go of both frees an ended run at once rather than by the cycle
        # collector (a ctx the workflow kept still raises Evicted).
        self._ctx = None
        self.root = None


def _result(raw: msgspec.Raw | bytes, result_type: Any) -> Any:
    """A recorded result as the command's annotation asks, else as plain JSON (a value the
    annotation no longer fits still reads back)."""
    try:
        return msgspec.json.decode(raw, type=result_type)
    except UNDECODABLE:  # a ValidationError too: read it as the JSON it is
        return msgspec.json.decode(raw)
