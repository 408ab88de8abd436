"""How a held task ends when its run does not simply finish here.

A run that waits (a timer, a signal) is suspended: its timers indexed, its task acknowledged,
and a wake-up that met the task in flight looked for. A run this worker cannot go on with is
handed back (its task NAKed for another worker) or, after a failure, backed off with a growing
delay and in the end parked. A task that cannot be a run's, a history that does not decode, a
run held as poisoned or parked: their tasks are set aside or acknowledged (see ``_guard``).
Each ending drops the run's lease with its task.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

import anyio
from natflow_engine import (
    Connection,
    CorruptHistory,
    History,
    NatflowError,
    Task,
    Timer,
    enqueue,
    last_signal_seq,
    quietly,
    schedule,
)
from natflow_engine.events import utcnow
from nats.aio.msg import Msg

from ._execution import HOLD_TIMERS_UNDER, RunExecution
from ._guard import RunGuard
from ._held import Held
from ._run_leases import RunLeases

log = logging.getLogger("natflow.worker")

_BACKOFF_FIRST = 0.5  # a failed task comes back after 0.5, 1, 2, 4 ... s
_BACKOFF_MAX = 60.0
# Seconds before a run handed back for a key this worker lacks comes back to any worker.
MISSING_KEY_DELAY: Final = 2.0
_PARK_AFTER = 8  # deliveries that failed in a row before the run is held as parked


class TaskEndings:
    """Ends held tasks for one worker: suspends, hands back, backs off, sets aside.

    Args:
        conn: The worker's connection.
        guard: The worker's quarantine (poisoned, parked and corrupt runs).
        leases: The leases of the runs the worker holds, dropped with each task.
        stopping: Set once the worker stops taking work.
        not_pulling: Set once the worker's pulls are withdrawn.
    """

    def __init__(
        self,
        conn: Connection,
        guard: RunGuard,
        leases: RunLeases,
        stopping: anyio.Event,
        not_pulling: anyio.Event,
    ) -> None:
        self._conn = conn
        self._guard = guard
        self._leases = leases
        self._stopping = stopping
        self._not_pulling = not_pulling

    async def suspend(self, held: Held, execution: RunExecution, *, again: bool = False) -> None:
        """Let a waiting run go, then close the lost-wake-up race (NATS.md §8): a timer or
        signal whose wake-up met this in-flight task was refused, so look again after the
        acknowledgement and enqueue the run if one did. ``again``: enqueue it in any case (a
        run that continued as new; should this worker die first, the engine enqueues it)."""
        if not again:  # a continued run's timers belong to the stretch it left
            await self._index_timers(held, execution)
        # Before the ack: the worker handed the run's next task (the wake-up enqueued below,
        # say) asks this one first, and must hear "free" (it would wait a lease period).
        held.released = True
        if not await quietly(held.msg.ack_sync(timeout=5), f"run {held.run_id}: its ack"):
            return  # the task comes back by itself
        await self._leases.release(held)
        due = execution.next_due
        woken = again or (due is not None and (due - utcnow()).total_seconds() <= HOLD_TIMERS_UNDER)
        if not woken:
            # Any run, not only one waiting for a signal: a cancel, terminate or pause is a
            # signal too, and one whose nudge met this run on its way out would otherwise wait
            # for the run's timer (a sleep of an hour: an hour).
            woken = await last_signal_seq(self._conn, held.run_id) > execution.signal_cursor
        if woken:
            task = Task(run_id=held.run_id, workflow=execution.workflow.name, reason="recheck")
            await enqueue(self._conn, held.queue, task)

    async def _index_timers(self, held: Held, execution: RunExecution) -> None:
        """Index the run's new timers so the engine wakes it on time."""
        pending = execution.timers_to_index()
        if not pending:
            return
        now = utcnow()  # recorded by this execution: moments ago
        try:
            await asyncio.gather(
                *(
                    schedule(
                        self._conn,
                        Timer(run_id=held.run_id, seq=seq, name=name, due_at=due, at=now),
                    )
                    for seq, name, due in pending
                )
            )
        except NatflowError as exc:  # the engine's dispatcher writes them too, a little later
            log.debug("run %s: timers not indexed here (%s)", held.run_id, exc)

    async def set_aside(self, msg: Msg, reason: str) -> None:
        """A task that cannot be a run's: dead-lettered (once) and terminated."""
        await self._guard.set_task_aside(msg, reason)
        await quietly(msg.term())

    async def held_in_quarantine(self, held: Held, history: History) -> bool:
        """Whether the run is (now) held as poisoned or parked: then its task is done."""
        if not await self._guard.holds(held.run_id, history):
            return False
        await quietly(held.msg.ack())
        return True

    async def hold_corrupt(self, held: Held, bad: CorruptHistory) -> None:
        """A run whose history does not decode: held as poisoned, its task done."""
        await self._guard.hold_corrupt(held.run_id, bad)
        await quietly(held.msg.ack())

    async def back_off(self, held: Held, exc: Exception, *, park: bool) -> None:
        """A task that failed: NAK it with a growing delay, never at once (no hot loop);
        after :data:`_PARK_AFTER` deliveries that failed alike, hold the run as parked."""
        delivered = held.msg.metadata.num_delivered or 1
        if park and await self._guard.failed(held.run_id, exc, delivered, _PARK_AFTER):
            await quietly(held.msg.ack())
        else:
            delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (delivered - 1))
            held.released = True
            await quietly(held.msg.nak(delay=delay))
        await self._leases.release(held)

    async def hand_back(
        self, held: Held, delay: float | None = None, *, quiet: bool = False
    ) -> None:
        """NAK the task (after ``delay`` seconds, if given) for another worker to take
        (``quiet``: said at debug level, for a hand-back this worker said before)."""
        if self._stopping.is_set():
            # A task NAKed while this worker's own pulls are still out could be delivered
            # right back here; let them be withdrawn first (shutdown waits the same way).
            with anyio.move_on_after(5):
                await self._not_pulling.wait()
        held.released = True  # before the NAK: the next taker's ping must hear "free"
        await quietly(held.msg.nak(delay=delay))
        await self._leases.release(held)
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "run %s: handed back", held.run_id, extra=held.execution_fields)
