"""A run's state as a pure fold over its history events."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from ._errors import ErrorInfo
from ._events import (
    Event,
    PatchMarked,
    RunBlocked,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepFailed,
    StepStarted,
)

RunStatus = Literal[
    "pending",
    "running",
    "sleeping",
    "waiting",
    "blocked",
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

    @property
    def is_closed(self) -> bool:
        return self.status in CLOSED_STATUSES


def _value(raw: msgspec.Raw) -> Any:
    return msgspec.json.decode(raw)


def fold_steps(events: list[Event]) -> list[StepInfo]:
    """Every step occurrence in the order the workflow asked for them."""
    steps: dict[int, StepInfo] = {}
    for event in events:
        if isinstance(event, StepStarted):
            steps[event.seq] = StepInfo(
                name=event.name,
                occurrence=event.occurrence,
                status="running",
                attempts=event.attempt,
                started_at=event.at,
                seq=event.seq,
            )
        elif isinstance(event, StepCompleted):
            steps[event.seq] = StepInfo(
                name=event.name,
                occurrence=event.occurrence,
                status="completed",
                attempts=event.attempt,
                started_at=event.started_at,
                finished_at=event.at,
                result=_value(event.result),
                seq=event.seq,
            )
        elif isinstance(event, StepFailed):
            steps[event.seq] = StepInfo(
                name=event.name,
                occurrence=event.occurrence,
                status="failed",
                attempts=event.attempt,
                started_at=event.started_at,
                finished_at=event.at,
                error=event.error,
                seq=event.seq,
            )
    return [steps[seq] for seq in sorted(steps)]


def fold_run(run_id: str, events: list[Event]) -> RunInfo | None:
    """The run's summary, or None if it has no events (it does not exist)."""
    if not events or not isinstance(events[0], RunStarted):
        return None
    start = events[0]
    info = RunInfo(
        run_id=run_id,
        workflow=start.workflow,
        queue=start.queue,
        status="pending",
        created_at=start.at,
        updated_at=start.at,
        parent=start.parent,
    )
    running: dict[int, str] = {}
    for event in events[1:]:
        info.updated_at = event.at
        apply_event(info, event, running)
    if info.status == "running":
        info.current = f"running step {running[max(running)]!r}" if running else "running"
    return info


def apply_event(info: RunInfo, event: Event, running: dict[int, str] | None = None) -> None:
    """Fold one event into ``info``; ``running`` tracks steps in flight, if wanted."""
    if running is None:
        running = {}
    if isinstance(event, RunClaimed):
        info.worker = event.worker
        info.status = "running"
        info.current = None
        info.error = None
    elif isinstance(event, StepStarted):
        running[event.seq] = event.name
        info.status = "running"
    elif isinstance(event, StepCompleted | StepFailed):
        running.pop(event.seq, None)
        info.status = "running"
    elif isinstance(event, PatchMarked):
        pass
    elif isinstance(event, RunBlocked):
        info.status = "blocked"
        info.error = event.error
        info.current = f"blocked: {event.error.message}"
    elif isinstance(event, RunCompleted):
        info.status = "completed"
        info.result = _value(event.result)
        info.closed_at = event.at
        info.current = None
    elif isinstance(event, RunFailed):
        info.status = "failed"
        info.error = event.error
        info.closed_at = event.at
        info.current = None
