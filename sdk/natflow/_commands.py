"""What workflow code asks for (commands) and what the driver hears back (items).

Every ``ctx`` call that history must remember gets the next position (``seq``): steps,
sleeps and signal waits. On replay a command is matched to history by position, kind and
name; a mismatch is a divergence (:class:`~natflow_engine.NonDeterminismError`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from natflow_engine import ErrorInfo, RateLimit, RetryPolicy
from natflow_engine.events import (
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepStarted,
    TimerScheduled,
)


@dataclass(eq=False, slots=True)
class Command:
    seq: int
    name: str
    future: asyncio.Future[Any]

    kind = "command"

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


@dataclass(eq=False, slots=True)
class StepCommand(Command):
    occurrence: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: RetryPolicy
    timeout: float | None
    result_type: Any
    workflow: str = ""  # for metrics and logs
    issued_at: float = field(default_factory=time.monotonic)  # or when its retry came due
    attempt: int = 1  # the attempt to run next (history's failed attempts plus one)
    rate: tuple[RateLimit, str | None] | None = None  # a shared rate limit and its key

    kind = "step"


@dataclass(eq=False, slots=True)
class SleepCommand(Command):
    due_at: datetime

    kind = "sleep"


@dataclass(eq=False, slots=True)
class WaitCommand(Command):
    timeout_at: datetime | None

    kind = "signal wait"


@dataclass(eq=False, slots=True)
class ChildCommand(Command):
    child_run_id: str
    queue: str
    parent_close: str
    input_json: bytes
    result_type: Any

    kind = "child"


def recorded_command(event: Event) -> tuple[int, str] | None:
    """The position and description of the command an event records, if it records one."""
    if isinstance(event, StepStarted | StepCompleted | StepFailed | StepRetrying):
        return event.seq, f"step {event.name!r}"
    if isinstance(event, TimerScheduled):
        return event.seq, f"sleep {event.name!r}"
    if isinstance(event, SignalWaited):
        return event.seq, f"signal wait {event.name!r}"
    if isinstance(event, ChildStarted | ChildCompleted | ChildFailed):
        return event.seq, f"child {event.name!r}"
    return None


# -- what the driver receives on the worker's loop -------------------------------------------


@dataclass
class Finished:
    """A step attempt ended: a result to record, or an error (retried at ``retry_at``)."""

    command: StepCommand
    attempt: int
    started_at: datetime
    result: bytes | None = None
    error: ErrorInfo | None = None
    retry_at: datetime | None = None  # set when another attempt follows


@dataclass
class StillRunning:
    """A step has run long enough to be worth a ``step_started`` event."""

    command: StepCommand
    attempt: int
    rate_limited_until: datetime | None = None  # not running yet: waiting for a rate slot
    started_at: datetime | None = None  # when its body began (a running step's notice)


@dataclass
class TimerDue:
    seq: int


@dataclass
class SignalsArrived:
    """The engine says signals for this run arrived while this worker holds it."""


Item = Finished | StillRunning | TimerDue | SignalsArrived
