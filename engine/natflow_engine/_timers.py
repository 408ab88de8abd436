"""Durable timers: sleeps, signal-wait timeouts and delayed starts.

The truth is in history (``timer_scheduled``, ``signal_waited`` with a timeout, a
``run_started`` with ``not_before``; ``timer_fired`` ends one). The engine's dispatcher keeps
the KV bucket ``natflow_timers`` in step with it (key ``<run_id>.<seq>``), and every engine
replica watches the whole bucket and keeps the timers in a heap in memory. When one comes due
the replica wakes the run; the worker that takes the run appends ``timer_fired`` (once: it is
the run's only writer) and never before the due time. Replicas racing on one timer produce at
most a duplicate wake-up, which changes nothing.

Why not the server's own schedules or per-message TTLs: they tick every 250 ms (NATS.md §3,
§5), and the target is a wake-up within 50 ms of the due time at p99; an in-process timer over
a durable index fires within a millisecond or two.
"""

from __future__ import annotations

import heapq
import logging
import time
from datetime import datetime
from typing import Final

import anyio
import anyio.abc
import msgspec

from ._connection import Connection
from ._errors import NatflowError
from ._index import RunIndex
from ._kv import kv_delete_nowait, kv_put, kv_watch
from ._log_repeats import level_for
from ._logs import fields
from ._metrics import TIMER_LATENESS, TIMERS_FIRED
from ._names import _TOKEN
from ._quarantine import quarantined
from ._reader import reader
from ._signals import dead_letter_item
from ._undecodable import UNDECODABLE
from ._wake import run_start, wake
from .events import (
    Event,
    RunContinued,
    RunStarted,
    SignalWaited,
    StepRetrying,
    TimerScheduled,
    utcnow,
)

log = logging.getLogger("natflow.timers")

TIMERS_BUCKET: Final = "natflow_timers"
# Runs are woken this much before their timer is due: the worker takes the run, replays it
# and fires the timer itself at the due time (never before), so a burst of timers coming due
# together is not late by the time it takes to take them all. 200 timers due within ~20 ms
# (the bench's, once its starts took one round trip) took longer than 0.3 s to take on the
# 2-core VM: p99 lateness 38 and 54 ms, against 10 and 29 ms with 0.6 s. It stays under the
# worker's ``HOLD_TIMERS_UNDER`` (1 s), or the woken run would only suspend again.
WAKE_AHEAD: Final = 0.6
RETRY_AFTER: Final = 30.0  # re-wake a timer nobody acknowledged (by firing it) this late
# A timer still unfired this long past its due time is marked in the run index as due and
# waiting for a worker (so `list(status="pending")` finds the run); a worker that is up
# fires it well within this.
DUE_NOTICE: Final = 1.0
LATE_NOTICE: Final = 1.0  # a timer woken later than this past its due time is logged


class Timer(msgspec.Struct, kw_only=True):
    v: int = 1
    run_id: str
    seq: int  # the command's position; 0 is a delayed start
    name: str
    due_at: datetime
    # When history recorded it: a timer is late only past both this and its due time (a
    # sleep_until an hour ago is not an hour late). None in an entry of an older natflow.
    at: datetime | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Timer)


def timer_of(run_id: str, event: Event) -> Timer | None:
    """The timer an event of the run sets (None if it sets none): a delayed start's, a
    sleep's, a signal wait's timeout, a retry's wait (the next attempt waits like a sleep)."""
    due: datetime | None = None
    seq, name = 0, "start"
    if isinstance(event, RunStarted) and not isinstance(event, RunContinued):
        due = event.not_before
    elif isinstance(event, TimerScheduled):
        due, seq, name = event.due_at, event.seq, event.name
    elif isinstance(event, SignalWaited):
        due, seq, name = event.timeout_at, event.seq, event.name
    elif isinstance(event, StepRetrying):
        due, seq, name = event.retry_at, event.seq, event.name
    if due is None:
        return None
    return Timer(run_id=run_id, seq=seq, name=name, due_at=due, at=event.at)


def timer_key(run_id: str, seq: int) -> str:
    return f"{run_id}.{seq}"


async def schedule(conn: Connection, timer: Timer) -> None:
    await kv_put(conn, TIMERS_BUCKET, timer_key(timer.run_id, timer.seq), _encoder.encode(timer))


async def cancel(conn: Connection, run_id: str, seq: int) -> None:
    await kv_delete_nowait(conn, TIMERS_BUCKET, timer_key(run_id, seq))


async def cancel_run(conn: Connection, run_id: str) -> None:
    """Drop every timer a finished run left behind."""
    await cancel_timers_through(conn, run_id, None)


async def cancel_timers_through(conn: Connection, run_id: str, through_seq: int | None) -> None:
    """Drop the run's timers of commands at positions up to ``through_seq`` (all if None).

    After ``ctx.continue_as_new`` the new stretch numbers its commands after the old one's
    (``run_continued.base_seq``), so the old stretch's timers are exactly those at or below
    it (the delayed start's, position 0, included)."""
    page = await reader(conn).read_all(
        f"KV_{TIMERS_BUCKET}", f"$KV.{TIMERS_BUCKET}.{run_id}.>", headers=True
    )
    for msg in page.messages:
        headers = msg.headers or {}
        if headers.get("KV-Operation") not in ("DEL", "PURGE"):
            subject = headers.get("Nats-Subject", msg.subject)  # a direct get's reply says it
            key = subject.split(".", 2)[2]
            if through_seq is not None and not _at_or_below(key, through_seq):
                continue
            await kv_delete_nowait(conn, TIMERS_BUCKET, key)


def _at_or_below(key: str, seq: int) -> bool:
    position = key.rpartition(".")[2]
    return position.isdigit() and int(position) <= seq


class TimerService:
    """Wakes runs when their timers come due; see the module docstring."""

    def __init__(self, conn: Connection, index: RunIndex | None = None) -> None:
        self._conn = conn
        self._index = index if index is not None else RunIndex(conn)
        self.timers: dict[str, Timer] = {}
        # (fire at, key, due, first): ``first`` is the wake-up the timer was entered with,
        # whose lateness is measured (not a retry of it)
        self._heap: list[tuple[float, str, float, bool]] = []
        self._changed = anyio.Event()
        self.fired = 0
        self.lateness: list[float] = []  # seconds past due when woken (recent, for metrics)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            while True:
                await self._next(tg)

    async def _watch(self) -> None:
        async for key, value, revision in kv_watch(self._conn, TIMERS_BUCKET):
            if value is None:
                self.timers.pop(key, None)
                continue
            try:
                timer = _decoder.decode(value)
            except UNDECODABLE as exc:
                self.timers.pop(key, None)
                await self._quarantine(key, value, revision, str(exc))
                continue
            known = self.timers.get(key)
            self.timers[key] = timer
            if known is not None and known.due_at == timer.due_at:
                continue  # written again (by the worker and the dispatcher): one wake-up
            due = timer.due_at.timestamp()
            # Not before now: a timer due within the wake-ahead (a short sleep), or already
            # past (sleep_until an hour ago), is woken at once, and late only past that.
            heapq.heappush(self._heap, (max(due - WAKE_AHEAD, time.time()), key, due, True))
            self._changed.set()

    async def _quarantine(self, key: str, value: bytes, revision: int, reason: str) -> None:
        """Set a bad entry aside: dead-letter it, delete it, and wake its run (if the key
        names one) so that the run's worker writes its real timers again."""
        reason = f"the timer entry does not decode: {reason}"
        if not quarantined("kv_timers", f"{TIMERS_BUCKET}/{key}", reason, logger=log):
            return
        run_id, _, _ = key.rpartition(".")
        try:
            subject = f"$KV.{TIMERS_BUCKET}.{key}"
            await dead_letter_item(
                self._conn, "kv", subject, reason, revision, value, run_id=run_id
            )
            await kv_delete_nowait(self._conn, TIMERS_BUCKET, key, revision=revision)
            start = await run_start(self._conn, run_id) if _TOKEN.fullmatch(run_id) else None
            if start is not None:
                await wake(self._conn, start, run_id, "timer entry replaced")
        except NatflowError as exc:
            log.warning("timer entry %s: could not set it aside (%s)", key, exc)

    async def _next(self, tg: anyio.abc.TaskGroup) -> None:
        changed = self._changed
        if not self._heap:
            await changed.wait()
            self._changed = anyio.Event()
            return
        fire_at, key, due, first = self._heap[0]
        delay = fire_at - time.time()
        if delay > 0:
            with anyio.move_on_after(delay):
                await changed.wait()
                self._changed = anyio.Event()
            return
        heapq.heappop(self._heap)
        timer = self.timers.get(key)
        if timer is None or timer.due_at.timestamp() != due:
            return  # deleted, or rescheduled under the same key
        heapq.heappush(self._heap, (max(fire_at, due) + RETRY_AFTER, key, due, False))
        if first:
            could = max(due, timer.at.timestamp()) if timer.at is not None else due
            late = max(0.0, time.time() - could)
            self.lateness.append(late)
            del self.lateness[:-1000]
            TIMER_LATENESS.observe(late)
            if late > LATE_NOTICE:
                log.warning(
                    "timer %s of run %s woken %.1f s late",
                    timer.name,
                    timer.run_id,
                    late,
                    extra=fields(timer.run_id, timer=timer.name),
                )
        tg.start_soon(self._fire, timer)

    async def _fire(self, timer: Timer) -> None:
        try:
            start = await run_start(self._conn, timer.run_id)
            if start is None:
                await cancel(self._conn, timer.run_id, timer.seq)
                return
            await wake(self._conn, start, timer.run_id, f"timer {timer.name}")
            self.fired += 1
            TIMERS_FIRED.inc()
            await self._mark_if_unfired(timer)
        except NatflowError as exc:
            log.log(
                level_for("timer wake-up"),
                "timer %s of run %s: wake-up failed (%s); retrying later (more such failures "
                "within 30 s are logged at debug)",
                timer.name,
                timer.run_id,
                exc,
            )

    async def _mark_if_unfired(self, timer: Timer) -> None:
        """Once the due time has passed with the timer unfired, the run index says so."""
        late = (timer.due_at - utcnow()).total_seconds() + DUE_NOTICE
        await anyio.sleep(max(0.0, late))
        current = self.timers.get(timer_key(timer.run_id, timer.seq))
        if current is None or current.due_at != timer.due_at:
            return  # fired (its key deleted), or rescheduled
        if await self._index.mark_due(timer.run_id, timer.name, timer.due_at):
            log.info(
                "run %s: timer %s due since %s and no worker has taken the run",
                timer.run_id,
                timer.name,
                timer.due_at.isoformat(),
                extra=fields(timer.run_id, timer=timer.name),
            )
