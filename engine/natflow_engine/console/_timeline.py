"""The run page's timeline: steps, sleeps and signal waits as bars on one time axis."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .._state import StepInfo
from ..events import (
    Event,
    SignalReceived,
    SignalWaited,
    TimerFired,
    TimerScheduled,
)


@dataclass(slots=True)
class Bar:
    """One row of the timeline; ``end`` is None while it is still going on."""

    kind: str  # "step", "sleep" or "signal"
    label: str
    status: str  # running, completed, failed, retrying, cancelled; sleeping, fired; waiting...
    start: datetime
    end: datetime | None
    attempts: int = 1
    detail: str = ""
    left: float = 0.0  # percent of the axis
    width: float = 0.0

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else (self.end - self.start).total_seconds()


def _waits(events: list[Event]) -> list[tuple[int, Bar]]:
    """Sleeps and signal waits, keyed by command sequence, closed by what ended them."""
    bars: dict[int, Bar] = {}
    waiting: dict[str, list[int]] = {}
    for event in events:
        if isinstance(event, TimerScheduled):
            bars[event.seq] = Bar(
                "sleep", event.name, "sleeping", event.at, None, detail=f"until {event.due_at}"
            )
        elif isinstance(event, SignalWaited):
            detail = f"timeout at {event.timeout_at}" if event.timeout_at else "no timeout"
            bars[event.seq] = Bar("signal", event.name, "waiting", event.at, None, detail=detail)
            waiting.setdefault(event.name, []).append(event.seq)
        elif isinstance(event, TimerFired) and event.seq in bars:
            bar = bars[event.seq]
            if bar.end is None:
                bar.end = event.at
                bar.status = "completed" if bar.kind == "sleep" else "timed out"
            for seqs in waiting.values():
                if event.seq in seqs:
                    seqs.remove(event.seq)
        elif isinstance(event, SignalReceived) and waiting.get(event.name):
            bar = bars[waiting[event.name].pop(0)]
            bar.end, bar.status = event.at, "completed"
    return sorted(bars.items())


def timeline(
    steps: list[StepInfo], events: list[Event], begin: datetime, finish: datetime
) -> list[Bar]:
    """Bars for every step and wait, in command order, placed on ``begin..finish``."""
    rows: list[tuple[int, Bar]] = []
    for step in steps:
        start = step.started_at or begin
        detail = f"{step.error.type}: {step.error.message}" if step.error else ""
        bar = Bar(
            "step",
            f"{step.name} #{step.occurrence}",
            step.status,
            start,
            step.finished_at,
            attempts=step.attempts,
            detail=detail,
        )
        rows.append((step.seq, bar))
    rows.extend(_waits(events))
    rows.sort(key=lambda row: (row[0], row[1].start))
    span = max((finish - begin).total_seconds(), 1e-3)
    bars = [bar for _, bar in rows]
    for bar in bars:
        end = bar.end or finish
        bar.left = max(0.0, min(100.0, (bar.start - begin).total_seconds() / span * 100))
        width = (end - bar.start).total_seconds() / span * 100
        bar.width = max(0.6, min(100.0 - bar.left, width))
    return bars
