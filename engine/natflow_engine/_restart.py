"""Restarting a closed run from a step, with the code now deployed.

A restart makes a new run, ``<run_id>-r<n>``, whose history is seeded with the original's
recorded outcomes before that step: its ``run_started`` (same workflow, queue and input,
``restarted_from`` naming the original), then every recorded command of an earlier position
(steps, sleeps, signal waits, fired timers, children that ended, with their outcomes), the
signals it had received and the patches it had marked, in their original order, then
``restart_seeded``. A worker replays that history
like any other: the copied steps return their recorded results without running; the named
step and every later one have no record, so they run. The original history stays as it was,
plus one ``run_restarted`` event naming the new run; the new run's ``run_started`` names the
original (``RunInfo.restarted_from`` / ``restarted_as``).

Nothing runs the new run before its seed is complete: the engine enqueues a restarted run's
task when it sees ``restart_seeded``, not at ``run_started`` (the restarting client enqueues
it too). A client that dies while seeding leaves a pending run that never starts; restart
the original again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import msgspec

from ._connection import Connection
from ._errors import InvalidInput, NatflowError, RunNotFound
from ._history import AppendConflict, HistoryStore
from ._names import check_run_id, derived_run_id
from ._state import fold_run
from ._streams import ensure_streams
from ._tasks import Task, enqueue
from .events import (
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    PatchMarked,
    RestartSeeded,
    RunContinued,
    RunRestarted,
    RunStarted,
    SignalReceived,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerFired,
    TimerScheduled,
    events_before,
    utcnow,
)

log = logging.getLogger("natflow.restart")

_COMMANDS = (StepStarted, StepCompleted, StepFailed, TimerScheduled, SignalWaited, TimerFired)
_CHILD_EVENTS = (ChildStarted, ChildCompleted, ChildFailed)
_MAX_TRIES = 100


def parse_step(text: str) -> tuple[str, int]:
    """``NAME`` or ``NAME#N`` (the n-th occurrence of a step name) as ``(name, n)``."""
    name, sep, number = text.rpartition("#")
    if not sep or not number.isdigit():
        return text, 1
    if int(number) < 1:
        raise InvalidInput(f"step occurrence in {text!r} must be 1 or more")
    return name, int(number)


@dataclass(frozen=True)
class Cut:
    """The step a restart runs again first: its command position, name and occurrence."""

    seq: int
    name: str
    occurrence: int


def cut_point(run_id: str, events: list[Event], from_step: tuple[str, int] | None) -> Cut:
    """The recorded step to restart from: the named occurrence, or, with ``from_step``
    None, the first step that failed."""
    steps = [e for e in events if isinstance(e, StepStarted | StepCompleted | StepFailed)]
    if from_step is None:
        for event in steps:
            if isinstance(event, StepFailed):
                return Cut(event.seq, event.name, event.occurrence)
        raise InvalidInput(
            f"run {run_id!r} has no failed step to restart from; name one with from_step "
            f"(`--from-step NAME[#N]`)"
        )
    name, occurrence = from_step
    for event in steps:
        if event.name == name and event.occurrence == occurrence:
            return Cut(event.seq, event.name, event.occurrence)
    known = sorted({f"{e.name}#{e.occurrence}" for e in steps})
    raise InvalidInput(
        f"run {run_id!r} recorded no step {name}#{occurrence}; its steps: "
        f"{', '.join(known) or 'none'}"
    )


def seed_events(events: list[Event], from_seq: int) -> list[Event]:
    """What a run restarted from command ``from_seq`` keeps of ``events`` (without its start).

    A child that ended before the cut is kept with its outcome, so the restarted run gets
    its result without starting it again (a charge made by a child is not made twice). A
    child with no recorded outcome (still open when the run closed) starts anew."""
    ended = {e.seq for e in events if isinstance(e, ChildCompleted | ChildFailed)}
    kept: list[Event] = []
    for event in events[1:]:
        if isinstance(event, _COMMANDS):
            if event.seq < from_seq:
                kept.append(event)
        elif isinstance(event, _CHILD_EVENTS):
            if event.seq < from_seq and event.seq in ended:
                kept.append(event)
        elif isinstance(event, SignalReceived | PatchMarked):
            kept.append(event)
    return kept


def restart_id(run_id: str, n: int) -> str:
    return derived_run_id(run_id, f"-r{n}")


async def restart_run(
    conn: Connection, run_id: str, from_step: str | tuple[str, int] | None = None
) -> str:
    """Restart closed run ``run_id`` from a step (see the module docstring); the new run id."""
    check_run_id(run_id)
    if not (
        from_step is None
        or isinstance(from_step, str)
        or (
            isinstance(from_step, tuple)
            and len(from_step) == 2
            and isinstance(from_step[0], str)
            and isinstance(from_step[1], int)
            and not isinstance(from_step[1], bool)
            and from_step[1] >= 1
        )
    ):
        raise InvalidInput(
            f"from_step is a step name, (name, occurrence) with an occurrence of 1 or more, "
            f"or None (the first failed step), not {from_step!r}"
        )
    await ensure_streams(conn)
    store = HistoryStore(conn)
    history = await store.read(run_id)
    info = fold_run(run_id, history.events)
    if info is None:
        raise RunNotFound(run_id)
    if not info.is_closed:
        raise NatflowError(
            f"run {run_id!r} is {info.status}; only a closed run can be restarted (cancel it first)"
        )
    wanted = parse_step(from_step) if isinstance(from_step, str) else from_step
    cut = cut_point(run_id, history.events, wanted)
    start = history.events[0]
    assert isinstance(start, RunStarted)
    seed = seed_events(history.events, cut.seq)
    new_id, last_seq = await _create(store, run_id, start)
    for position, event in enumerate(seed, start=2):
        copy = msgspec.structs.replace(event, id=f"{new_id}:{position}")
        last_seq = await store.append(new_id, copy, last_seq)
    marker = RestartSeeded(
        at=utcnow(),
        source=run_id,
        from_seq=cut.seq,
        step=cut.name,
        occurrence=cut.occurrence,
        copied=len(seed),
    )
    count = len(seed) + 2
    await store.append(new_id, msgspec.structs.replace(marker, id=f"{new_id}:{count}"), last_seq)
    await enqueue(conn, start.queue, Task(run_id=new_id, workflow=start.workflow, reason="restart"))
    await _link(store, run_id, new_id, cut, _positions_used(history.events), history.last_seq)
    log.info("run %s restarted from step %s#%d as %s", run_id, cut.name, cut.occurrence, new_id)
    return new_id


async def _create(store: HistoryStore, run_id: str, start: RunStarted) -> tuple[str, int]:
    """Create the next free ``<run_id>-r<n>`` with the original's start; (id, its seq)."""
    for n in range(1, _MAX_TRIES + 1):
        new_id = restart_id(run_id, n)
        event = msgspec.structs.replace(
            start, id=f"{new_id}:1", at=utcnow(), restarted_from=run_id, not_before=None
        )
        if isinstance(event, RunContinued):  # a continued run: the restart starts now,
            # at position 1 (its events' ids are positions; readers place them by those)
            event = msgspec.structs.replace(
                event, run_started_at=None, run_stored_at=None, events_before=0
            )
        try:
            return new_id, await store.append(new_id, event, 0)
        except AppendConflict:
            continue
    raise NatflowError(f"run {run_id!r} was restarted {_MAX_TRIES} times already")


def _positions_used(events: list[Event]) -> int:
    """The position of the last of a stretch's events."""
    return events_before(events[0]) + len(events) if events else 0


async def _link(
    store: HistoryStore, run_id: str, new_id: str, cut: Cut, count: int, last_seq: int
) -> None:
    """Append ``run_restarted`` to the original (retrying if another restart wrote first)."""
    for _ in range(5):
        event = RunRestarted(
            id=f"{run_id}:{count + 1}",
            at=utcnow(),
            restarted_as=new_id,
            step=cut.name,
            occurrence=cut.occurrence,
        )
        try:
            await store.append(run_id, event, last_seq)
            return
        except AppendConflict:
            history = await store.read(run_id)
            count, last_seq = _positions_used(history.events), history.last_seq
    log.warning("run %s: could not record that it was restarted as %s", run_id, new_id)
