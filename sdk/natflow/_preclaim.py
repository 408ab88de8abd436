"""Claiming a new run while its history is read: one round trip where there were two.

A new run's task carries its ``run_started`` and that event's stream sequence. The worker
still reads history (the task is a hint, never the truth: its inline start is checked, not
used), but it need not wait for the read before it claims: the claim is a conditional
append that expects the start's sequence as the run's last, so it succeeds only while the
run has nothing after its start, and fences every other claimer exactly as a claim written
after the read would. Read, claim and the run's lease go out together, and the one look for
waiting signals follows the lease: a signal stored before the look is seen by it, and one
stored after it finds the lease, so the engine nudges this worker (``natflow_engine._wake``).
Looked before the lease, a signal stored in between would reach no one: the engine finds the
task in flight and no holder to nudge.

Whatever the read shows, the claim stays valid (it says "this worker holds the run", not
what the run is): the execution is built from history. A claim that meets a newer history,
or a read that does not match what the claim proves, falls back to the ordinary path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
from natflow_engine import (
    AppendConflict,
    Connection,
    History,
    HistoryStore,
    Task,
    last_signal_seq,
)
from natflow_engine.events import RunClaimed, RunStarted, decode_event, utcnow

log = logging.getLogger("natflow.worker")


@dataclass(frozen=True)
class Preclaim:
    """A claim written beside the history read: its sequence, its event, and the run's
    newest signal sequence seen at the time (0: none)."""

    seq: int
    event: RunClaimed
    signal_seq: int


# A sealed value or a reference to the value store begins so. Such a start is not claimed
# ahead of its read: a worker without the key, or one that cannot load the value, must hand
# the task back having written nothing (a claim with no progress counts toward poisoning
# once its worker is gone).
_SPECIAL_VALUE = b'{"$natflow_'


def inline_start(task: Task, delivery: int) -> RunStarted | None:
    """The task's inline start if the run may be claimed without waiting for the read: a
    first delivery of a new run that starts now (not delayed, not a restart) with an input
    this worker needs nothing more to open."""
    if task.start_seq <= 0 or delivery != 1:
        return None
    try:
        start = decode_event(task.start)
    except Exception:  # a forged or garbled task: the ordinary path says so
        return None
    if not isinstance(start, RunStarted) or start.not_before or start.restarted_from:
        return None
    if bytes(start.input).lstrip().startswith(_SPECIAL_VALUE):
        return None
    return start


async def read_and_claim(
    store: HistoryStore,
    conn: Connection,
    run_id: str,
    start_seq: int,
    identity: str,
    take_lease: Callable[[], Awaitable[object]],
) -> tuple[History, Preclaim | None]:
    """Read the run's history, claim it as the event after ``start_seq`` and take its lease
    (``take_lease``, then one look for its signals), all at once. Returns the history
    (without this claim) and the claim, or the history alone (read again) when the claim met
    a newer history or the read disagrees."""
    claim = RunClaimed(id=f"{run_id}:2", at=utcnow(), worker=identity, delivery=1)
    found: dict[str, object] = {}

    async def read() -> None:
        found["history"] = await store.read(run_id)

    async def append() -> None:
        try:
            found["seq"] = await store.append(run_id, claim, start_seq)
        except AppendConflict:
            found["seq"] = 0

    async def lease_then_look() -> None:
        await take_lease()  # first: see the module docstring
        found["signal"] = await last_signal_seq(conn, run_id)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(lease_then_look)
            await append()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # the worker handles the error, not the group
            raise group.exceptions[0] from None
        raise
    history = found["history"]
    seq, signal = found["seq"], found["signal"]
    assert isinstance(history, History) and isinstance(seq, int) and isinstance(signal, int)
    if seq and _only_start(history, claim, start_seq):
        if len(history.events) == 2:  # the read saw this claim: it is not to be replayed
            history.events = history.events[:1]
        history.last_seq = start_seq
        return history, Preclaim(seq=seq, event=claim, signal_seq=signal)
    # The run moved on before the claim, or a replica's read lagged behind it: read again,
    # after the claim (if written, history now shows it and the execution claims anew).
    log.debug("run %s: claim beside the read did not hold (seq %d); reading again", run_id, seq)
    return await store.read(run_id), None


def _only_start(history: History, claim: RunClaimed, start_seq: int) -> bool:
    """Whether the read shows the run's start and nothing after it but this claim."""
    events = history.events
    if not events or not isinstance(events[0], RunStarted):
        return False
    if len(events) == 1:
        return history.last_seq == start_seq
    seen = events[1] if len(events) == 2 else None
    return isinstance(seen, RunClaimed) and (seen.id, seen.worker, seen.at) == (
        claim.id,
        claim.worker,
        claim.at,
    )
