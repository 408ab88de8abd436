"""A run's state as a pure fold over its history events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

import msgspec

from ._errors import ErrorInfo
from ._human import when
from .events import (
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    RestartSeeded,
    RunBlocked,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunPaused,
    RunReleased,
    RunRestarted,
    RunResumed,
    RunStarted,
    RunSuspended,
    RunTerminated,
    SignalReceived,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepStarted,
    TimerFired,
    TimerScheduled,
    Trigger,
)

RunStatus = Literal[
    "pending",
    "running",
    "sleeping",
    "waiting",
    "blocked",
    "paused",
    "completed",
    "failed",
    "cancelled",
    "terminated",
]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
CLOSED_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled", "terminated"})

StepStatus = Literal["running", "completed", "failed", "retrying", "cancelled"]


class StepInfo(msgspec.Struct, kw_only=True):
    """One step occurrence of a run, as history records it."""

    name: str
    occurrence: int
    status: StepStatus
    attempts: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: ErrorInfo | None = None
    seq: int = 0


class RunInfo(msgspec.Struct, kw_only=True):
    """A run's summary: what ``describe``, ``status`` and ``list`` return."""

    run_id: str
    workflow: str
    queue: str
    status: RunStatus
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None
    current: str | None = None
    result: Any = None
    error: ErrorInfo | None = None
    worker: str | None = None
    parent: str | None = None
    trigger: Trigger | None = None  # the schedule fire or event that started the run
    due_at: datetime | None = None  # when the timer the run waits for (if any) comes due
    restarted_from: str | None = None  # the run this one restarted
    restarted_as: str | None = None  # the run that restarted this one (the latest)
    # Set on a site run seen from the hub (ops/sites): the site it lives in, and when the hub
    # last heard from that site (its copy of the run's summary is at least that fresh).
    site: str | None = None
    site_seen_at: datetime | None = None
    # Which stretch of history the run is in: 1 until ``ctx.continue_as_new``, which starts
    # the next (``stretch - 1`` stretches came before; history holds the current one).
    stretch: int = 1

    @property
    def is_closed(self) -> bool:
        return self.status in CLOSED_STATUSES


def _value(raw: msgspec.Raw) -> Any:
    return msgspec.json.decode(raw)


def fold_steps(events: list[Event]) -> list[StepInfo]:
    """Every step occurrence in the order the workflow asked for them."""
    steps: dict[int, StepInfo] = {}
    for event in events:
        if isinstance(event, StepStarted | StepCompleted | StepFailed | StepRetrying):
            info = _step_info(event)
            earlier = steps.get(event.seq)
            if earlier is not None and earlier.started_at is not None:
                # When the first attempt started: the earliest time known. A step_started is
                # written once the step has run a while, at that time; the step's outcome
                # carries when it really began (a Took half a second short, before).
                known = [t for t in (earlier.started_at, info.started_at) if t is not None]
                info.started_at = min(known)
            steps[event.seq] = info
        elif isinstance(event, RunCompleted | RunFailed | RunCancelled | RunTerminated):
            # The run ended with these steps in flight: they will never finish.
            for step in steps.values():
                if step.status in ("running", "retrying"):
                    step.status, step.finished_at = "cancelled", event.at
    return [steps[seq] for seq in sorted(steps)]


def _step_info(event: StepStarted | StepCompleted | StepFailed | StepRetrying) -> StepInfo:
    if isinstance(event, StepRetrying):
        return StepInfo(
            name=event.name,
            occurrence=event.occurrence,
            status="retrying",
            attempts=event.attempt,
            started_at=event.started_at,
            error=event.error,
            seq=event.seq,
        )
    info = StepInfo(
        name=event.name,
        occurrence=event.occurrence,
        status="running",
        attempts=event.attempt,
        started_at=event.started_at or event.at if isinstance(event, StepStarted) else event.at,
        seq=event.seq,
    )
    if isinstance(event, StepCompleted):
        info.status, info.result = "completed", _value(event.result)
    elif isinstance(event, StepFailed):
        info.status, info.error = "failed", event.error
    if not isinstance(event, StepStarted):
        info.started_at, info.finished_at = event.started_at, event.at
    return info


def fold_run(run_id: str, events: list[Event]) -> RunInfo | None:
    """The run's summary, or None if it has no events (it does not exist).

    ``due_at`` is when the timer the run waits for (a sleep, a wait's timeout, a step's next
    attempt) comes due; whether it is overdue is the engine's to say (:func:`mark_due`).
    """
    if not events or not isinstance(events[0], RunStarted):
        return None
    start = events[0]
    info = new_info(run_id, start)
    running: dict[int, str] = {}
    for event in events[1:]:
        apply_event(info, event, running)
    if info.is_closed or info.status in ("blocked", "paused"):
        return info
    waits = pending_waits(events)
    info.due_at = None
    if running:
        info.status, info.current = "running", running[max(running)]
    elif waits:
        info.status, info.current, _, _ = waits[0]
        info.due_at = min((due for _, _, due, _ in waits if due is not None), default=None)
    elif info.status == "running":
        info.current = "running"
    return info


def mark_due(info: RunInfo, timer: str) -> None:
    """The run's timer came due and no worker has taken the run yet."""
    assert info.due_at is not None
    info.status = "pending"
    info.current = f"timer {timer!r} due since {when(info.due_at)}, waiting for a worker"


def new_info(run_id: str, start: RunStarted) -> RunInfo:
    """The summary of a run whose history begins with ``start`` (a ``run_continued`` too)."""
    info = RunInfo(
        run_id=run_id,
        workflow=start.workflow,
        queue=start.queue,
        status="pending",
        created_at=start.at,
        updated_at=start.at,
        parent=start.parent,
        trigger=start.trigger,
        restarted_from=start.restarted_from,
    )
    if isinstance(start, RunContinued):
        _continued(info, start)
        info.created_at = start.run_started_at or start.at
    if start.not_before is not None and start.rate_limited is not None:
        info.current = f"rate limited until {when(start.not_before)} (limit {start.rate_limited})"
    elif start.not_before is not None and start.debounce is not None:
        info.current = f"debounced: starts at {when(start.not_before)} with the latest input"
    elif start.not_before is not None:
        info.current = f"starts at {when(start.not_before)}"
    return info


def pending_waits(events: list[Event]) -> list[tuple[RunStatus, str, datetime | None, str]]:
    """Sleeps, signal waits and step retries not yet resolved, earliest command first:
    ``(status, current, due time of its timer or None, timer name)``.

    Mirrors the workflow's own matching: a signal goes to the oldest waiter of its name, and
    a timer that fired after its wait was satisfied changes nothing.
    """
    pending: dict[int, tuple[RunStatus, str, datetime | None, str]] = {}
    waiting: dict[str, list[int]] = {}
    for event in events:
        if isinstance(event, TimerScheduled):
            text = sleeping_text(event.due_at)
            pending[event.seq] = ("sleeping", text, event.due_at, event.name)
        elif isinstance(event, SignalWaited):
            text = waiting_text(event.name, event.timeout_at)
            pending[event.seq] = ("waiting", text, event.timeout_at, event.name)
            waiting.setdefault(event.name, []).append(event.seq)
        elif isinstance(event, StepRetrying):
            pending[event.seq] = ("sleeping", retrying_text(event), event.retry_at, event.name)
        elif isinstance(event, ChildStarted):
            text = f"waiting for child run {event.child_run_id} ({event.name})"
            pending[event.seq] = ("waiting", text, None, event.name)
        elif isinstance(event, ChildCompleted | ChildFailed):
            pending.pop(event.seq, None)
        elif isinstance(event, TimerFired):
            pending.pop(event.seq, None)
            for seqs in waiting.values():
                if event.seq in seqs:
                    seqs.remove(event.seq)
        elif isinstance(event, SignalReceived) and waiting.get(event.name):
            pending.pop(waiting[event.name].pop(0), None)
    return [pending[seq] for seq in sorted(pending)]


def sleeping_text(due_at: datetime) -> str:
    """``current`` of a run in a durable sleep."""
    return f"sleeping until {when(due_at)}"


def waiting_text(name: str, timeout_at: datetime | None) -> str:
    """``current`` of a run waiting for a signal."""
    timeout = f" (timeout at {when(timeout_at)})" if timeout_at else ""
    return f"waiting for signal {name!r}{timeout}"


def retrying_text(event: StepRetrying) -> str:
    """``current`` of a run whose step waits for its next attempt."""
    return (
        f"retrying step {event.name!r}: attempt {event.attempt + 1} at "
        f"{when(event.retry_at)} (attempt {event.attempt} failed: {event.error})"
    )


def apply_event(info: RunInfo, event: Event, running: dict[int, str] | None = None) -> None:
    """Fold one event into ``info``; ``running`` tracks steps in flight, if wanted.

    Applied to run-level events alone (as the run index does), sleeping and waiting are
    approximate: the exact answer needs the whole history (:func:`fold_run`).
    """
    if running is None:
        running = {}
    info.updated_at = event.at
    if isinstance(event, RunContinued):
        running.clear()  # the older stretch's steps are gone with it
        _continued(info, event)
        return
    if isinstance(event, RunRestarted):
        info.restarted_as = event.restarted_as
        return
    if isinstance(event, RestartSeeded):  # copied outcomes end here; no worker has it yet
        info.status, info.current = "pending", f"restarts at step {event.step}#{event.occurrence}"
        return
    if _apply_pause(info, event, running):
        return
    if isinstance(event, RunClaimed):
        info.worker = event.worker
        info.status, info.current, info.error, info.due_at = "running", None, None, None
    elif isinstance(event, RunReleased):  # its steps stopped with the worker; none runs now
        running.clear()
        why = f" ({event.reason})" if event.reason else ""
        info.status = "pending"
        info.current = f"handed back by worker {event.worker}{why}; waits for a worker"
    elif isinstance(event, StepStarted):
        running[event.seq] = step_text(event)
        info.status = "running"
    elif isinstance(event, StepCompleted | StepFailed):
        running.pop(event.seq, None)
        info.status = "running"
    elif isinstance(event, StepRetrying):
        running.pop(event.seq, None)
        info.status, info.current = "sleeping", retrying_text(event)
        info.due_at = event.retry_at
    elif isinstance(event, TimerScheduled):
        info.status, info.current = "sleeping", sleeping_text(event.due_at)
        info.due_at = event.due_at
    elif isinstance(event, RunSuspended):
        info.status = "waiting" if event.status == "waiting" else "sleeping"
        info.current, info.due_at = event.current, event.due_at
    elif isinstance(event, SignalWaited):
        info.status, info.current = "waiting", f"waiting for signal {event.name!r}"
        info.due_at = event.timeout_at
    elif isinstance(event, RunBlocked):
        info.status = "blocked"
        info.error = event.error
        info.current = f"blocked: {event.error.message}"
    elif isinstance(event, RunCompleted):
        info.status = "completed"
        info.result = _value(event.result)
        _closed(info, event)
    elif isinstance(event, CancelRequested):
        info.current = "terminating" if event.terminate else "cancelling"
    elif isinstance(event, RunCancelled | RunTerminated):
        info.status = "cancelled" if isinstance(event, RunCancelled) else "terminated"
        kind = "RunCancelled" if isinstance(event, RunCancelled) else "RunTerminated"
        info.error = ErrorInfo(type=kind, message=event.reason or info.status)
        _closed(info, event)
    elif isinstance(event, RunFailed):
        info.status = "failed"
        info.error = event.error
        _closed(info, event)


def _closed(info: RunInfo, event: Event) -> None:
    info.closed_at = event.at
    # A closed run waits for nothing. A sleep's or a wait's due time folded before the end
    # stayed otherwise: no claim (which clears it) need come between, as when a worker held
    # the run through a short sleep or a cancel ended a wait.
    info.current, info.due_at = None, None


def _continued(info: RunInfo, event: RunContinued) -> None:
    info.stretch = event.stretch
    # Still running to anyone watching (no lifecycle event per stretch): its worker has
    # already enqueued the next stretch.
    info.status = "paused" if event.paused else "running"
    info.current = f"continued as new (stretch {event.stretch})"
    info.error, info.due_at = None, None


_ENDS_PAUSE = (RunResumed, RunBlocked, RunCompleted, RunFailed, RunCancelled, RunTerminated)


def _apply_pause(info: RunInfo, event: Event, running: dict[int, str]) -> bool:
    """Pausing and resuming; True if ``event`` is folded here (a paused run stays paused
    whatever else it records, such as a step that was running when it was paused)."""
    if isinstance(event, RunPaused):
        info.status = "paused"
        info.current = f"paused: {event.reason}" if event.reason else "paused"
        return True
    if info.status != "paused" or isinstance(event, _ENDS_PAUSE):
        if isinstance(event, RunResumed):
            info.status, info.current = "running", None
            return True
        return False
    if isinstance(event, StepStarted):
        running[event.seq] = step_text(event)
    elif isinstance(event, StepCompleted | StepFailed):
        running.pop(event.seq, None)
    return True


def step_text(event: StepStarted) -> str:
    """``current`` of a run whose latest running step is this one."""
    if event.rate_limited_until is not None:
        return (
            f"step {event.name!r} rate limited until {when(event.rate_limited_until)} "
            f"(limit {event.rate_limit})"
        )
    return f"running step {event.name!r}"
