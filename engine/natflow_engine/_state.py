"""A run's state as a pure fold over its history events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from ._errors import ErrorInfo
from .events import (
    CancelRequested,
    Event,
    RestartSeeded,
    RunBlocked,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunPaused,
    RunRestarted,
    RunResumed,
    RunStarted,
    RunTerminated,
    SignalReceived,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    TimerScheduled,
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
    restarted_from: str | None = None  # the run this one restarted
    restarted_as: str | None = None  # the run that restarted this one (the latest)

    @property
    def is_closed(self) -> bool:
        return self.status in CLOSED_STATUSES


def _value(raw: msgspec.Raw) -> Any:
    return msgspec.json.decode(raw)


def fold_steps(events: list[Event]) -> list[StepInfo]:
    """Every step occurrence in the order the workflow asked for them."""
    steps: dict[int, StepInfo] = {}
    for event in events:
        if isinstance(event, StepStarted | StepCompleted | StepFailed):
            steps[event.seq] = _step_info(event)
    return [steps[seq] for seq in sorted(steps)]


def _step_info(event: StepStarted | StepCompleted | StepFailed) -> StepInfo:
    info = StepInfo(
        name=event.name,
        occurrence=event.occurrence,
        status="running",
        attempts=event.attempt,
        started_at=event.at,
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
    """The run's summary, or None if it has no events (it does not exist)."""
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
    if running:
        info.status, info.current = "running", f"running step {running[max(running)]!r}"
    elif waits:
        info.status, info.current = waits[0]
    elif info.status == "running":
        info.current = "running"
    return info


def new_info(run_id: str, start: RunStarted) -> RunInfo:
    info = RunInfo(
        run_id=run_id,
        workflow=start.workflow,
        queue=start.queue,
        status="pending",
        created_at=start.at,
        updated_at=start.at,
        parent=start.parent,
        restarted_from=start.restarted_from,
    )
    if start.not_before is not None:
        info.current = f"starts at {start.not_before.isoformat()}"
    return info


def pending_waits(events: list[Event]) -> list[tuple[RunStatus, str]]:
    """Sleeps and signal waits not yet resolved, earliest command first.

    Mirrors the workflow's own matching: a signal goes to the oldest waiter of its name, and
    a timer that fired after its wait was satisfied changes nothing.
    """
    pending: dict[int, tuple[RunStatus, str]] = {}
    waiting: dict[str, list[int]] = {}
    for event in events:
        if isinstance(event, TimerScheduled):
            pending[event.seq] = ("sleeping", f"sleeping until {event.due_at.isoformat()}")
        elif isinstance(event, SignalWaited):
            timeout = f" (timeout at {event.timeout_at.isoformat()})" if event.timeout_at else ""
            pending[event.seq] = ("waiting", f"waiting for signal {event.name!r}{timeout}")
            waiting.setdefault(event.name, []).append(event.seq)
        elif isinstance(event, TimerFired):
            pending.pop(event.seq, None)
            for seqs in waiting.values():
                if event.seq in seqs:
                    seqs.remove(event.seq)
        elif isinstance(event, SignalReceived) and waiting.get(event.name):
            pending.pop(waiting[event.name].pop(0), None)
    return [pending[seq] for seq in sorted(pending)]


def apply_event(info: RunInfo, event: Event, running: dict[int, str] | None = None) -> None:
    """Fold one event into ``info``; ``running`` tracks steps in flight, if wanted.

    Applied to run-level events alone (as the run index does), sleeping and waiting are
    approximate: the exact answer needs the whole history (:func:`fold_run`).
    """
    if running is None:
        running = {}
    info.updated_at = event.at
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
        info.status, info.current, info.error = "running", None, None
    elif isinstance(event, StepStarted):
        running[event.seq] = event.name
        info.status = "running"
    elif isinstance(event, StepCompleted | StepFailed):
        running.pop(event.seq, None)
        info.status = "running"
    elif isinstance(event, TimerScheduled):
        info.status, info.current = "sleeping", f"sleeping until {event.due_at.isoformat()}"
    elif isinstance(event, SignalWaited):
        info.status, info.current = "waiting", f"waiting for signal {event.name!r}"
    elif isinstance(event, RunBlocked):
        info.status = "blocked"
        info.error = event.error
        info.current = f"blocked: {event.error.message}"
    elif isinstance(event, RunCompleted):
        info.status = "completed"
        info.result = _value(event.result)
        info.closed_at = event.at
        info.current = None
    elif isinstance(event, CancelRequested):
        info.current = "terminating" if event.terminate else "cancelling"
    elif isinstance(event, RunCancelled | RunTerminated):
        info.status = "cancelled" if isinstance(event, RunCancelled) else "terminated"
        info.error = ErrorInfo(type="RunCancelled", message=event.reason or info.status)
        info.closed_at = event.at
        info.current = None
    elif isinstance(event, RunFailed):
        info.status = "failed"
        info.error = event.error
        info.closed_at = event.at
        info.current = None


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
        running[event.seq] = event.name
    elif isinstance(event, StepCompleted | StepFailed):
        running.pop(event.seq, None)
    return True
