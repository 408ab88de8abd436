"""Claiming a new run without a round trip of its own.

A new run's task carries its ``run_started`` and that event's stream sequence. The worker
does not take the task's word for it (the task is a hint, never the truth), but it need not
read the run's history first either: the claim is a conditional append that expects the
start's sequence as the run's last, so it succeeds only while the run has nothing after its
start, and fences every other claimer exactly as a claim written after a read would. What
the claim cannot prove, that the message at that sequence is this run's start, one lookup
by sequence shows (``HistoryStore.read_start``). Together they are the whole history, read
without a read by subject, which makes the server walk every message stored since the
start (under load, most of its CPU). Lookup, claim and the run's lease go out together, and
the one look for waiting signals follows the lease: a signal stored before the look is seen
by it, and one stored after it finds the lease, so the engine nudges this worker
(``natflow_engine._wake``). Looked before the lease, a signal stored in between would reach
no one: the engine finds the task in flight and no holder to nudge.

Whatever the lookup shows, the claim stays valid (it says "this worker holds the run", not
what the run is): the execution is built from history. A claim that meets a newer history,
or a lookup that does not find this run's start, falls back to the ordinary path (a whole
read).

A start delivered by a start consumer is the stored message itself (``start_history``): it
needs no lookup. A busy worker (one that holds other runs) claims it beside its lease, as
above, where the claim joins the batch of the other runs' appends. An idle one has nothing
left to wait for and claims it beside its first steps (:class:`ClaimAhead`): the workflow
starts at once, every append waits for the claim and is fenced by it
(``RunRecorder.expect_claim``), and a step's body starts once the claim and the lease are
on the wire (``RunRecorder.claim_sent``), so that a step that blocks the event loop or ends
the process still leaves its run claimed. A claim that misses (the run was cancelled, or
another worker took it, within that round trip) gives the execution up before anything is
recorded: its steps ran and are run again by whoever holds the run, as after a crash.
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
    one_error,
)
from natflow_engine.events import RunClaimed, RunStarted, decode_event, utcnow

log = logging.getLogger("natflow.worker")


@dataclass(frozen=True)
class ClaimAhead:
    """A new run, from its stored start, to be claimed beside its first steps."""


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
    *,
    stored: History | None = None,
) -> tuple[History, Preclaim | None]:
    """Look up the run's start, claim the run as the event after ``start_seq`` and take its
    lease (``take_lease``, then one look for its signals), all at once. Returns the history
    (the start alone) and the claim, or the history alone (read whole) when the claim met a
    newer history or the lookup did not find this run's start there. ``stored``: the start
    as history delivered it (a start consumer's message is the stored one): no lookup."""
    claim = RunClaimed(id=f"{run_id}:2", at=utcnow(), worker=identity, delivery=1)
    found: dict[str, object] = {"history": stored}

    async def read() -> None:
        found["history"] = await store.read_start(run_id, start_seq)

    async def append() -> None:
        try:
            found["seq"] = await store.append(run_id, claim, start_seq)
        except AppendConflict:
            found["seq"] = 0

    async def lease_then_look() -> None:
        await take_lease()  # first: see the module docstring
        found["signal"] = await last_signal_seq(conn, run_id)

    with one_error():  # the worker handles the error, not the group
        async with anyio.create_task_group() as tg:
            if stored is None:
                tg.start_soon(read)
            tg.start_soon(lease_then_look)
            await append()
    history = found["history"]
    seq, signal = found["seq"], found["signal"]
    assert history is None or isinstance(history, History)
    assert isinstance(seq, int) and isinstance(signal, int)
    if seq and history is not None:
        return history, Preclaim(seq=seq, event=claim, signal_seq=signal)
    # The run moved on before the claim, the hint named no start of this run, or a
    # replica's lookup lagged behind: read the whole history, after the claim (if written,
    # history now shows it and the execution claims anew).
    log.debug("run %s: claim beside the lookup did not hold (seq %d); reading", run_id, seq)
    return await store.read(run_id), None
