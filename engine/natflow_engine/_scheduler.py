"""The schedule service: starts each schedule's fires on time, on every engine replica.

Leaderless, by choice. Every replica watches the whole ``natflow_schedules`` bucket and acts
on every fire that comes due: it reads the entry, decides (:func:`_schedules.plan`), writes
the decision back with a revision check, then starts the decided runs. Two replicas racing
on one fire both derive the same run id (``<schedule>-<fire time>``); the history's
conditional create lets one run exist, and only one decision is stored (the other replica's
write is refused, it reads again and finds the fire dealt with). A replica that dies between
storing a decision and starting its run leaves it in ``pending``, which any replica starts
once it has waited ``PENDING_GRACE`` (the deciding replica starts it at once). A KV-lease
leader would do the same work on one process but add its lease's expiry to the lateness of
every fire after a leader dies; with no leader a dead replica costs little (its undone
starts wait the grace), and the cost of leaderless (one read and one refused write per extra
replica per fire) is small next to a run's start.

Fires are never early: a replica acts on a fire only once its clock has passed the fire time
plus the fire's jitter. Fires that came due while no engine ran are dealt with, oldest first,
on the next pass: started if within the schedule's ``catchup_window``, else recorded as missed.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import anyio
import msgspec

from ._connection import Connection
from ._errors import NatflowError
from ._flow_decls import start_declared
from ._history import HistoryStore
from ._kv import kv_watch
from ._log_repeats import level_for
from ._logs import fields
from ._metrics import SCHEDULE_FIRES, SCHEDULE_LATENESS
from ._quarantine import quarantined
from ._runs import Runs
from ._schedules import (
    Schedule,
    ScheduleConflict,
    ScheduleFire,
    UnreadableSchedule,
    due_at,
    get_schedule,
    next_due,
    plan,
    put_schedule,
    read_schedule,
)
from ._signals import CANCEL, TERMINATE, send
from ._streams import SCHEDULES_BUCKET
from ._undecodable import UNDECODABLE
from .events import TERMINAL_EVENTS, Trigger, utcnow

log = logging.getLogger("natflow.schedules")

POLL_OPEN_RUNS: Final = 0.5  # how often a schedule with a buffered fire checks its runs
RETRY_AFTER: Final = 1.0  # after a pass that failed (server away)
PENDING_GRACE: Final = 2.0  # a decided start not made by then is made by any replica
_ATTEMPTS: Final = 10


class Scheduler:
    """Keeps every schedule's fires on time; see the module docstring."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._runs = Runs(conn)
        self._history = HistoryStore(conn)
        self.schedules: dict[str, Schedule] = {}
        self._retry_at: dict[str, float] = {}
        self._changed = anyio.Event()
        self.started = 0
        self.lateness: list[float] = []  # seconds from due to started, recent fires

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            while True:
                await self._tick()

    async def _watch(self) -> None:
        async for key, value, _ in kv_watch(self._conn, SCHEDULES_BUCKET):
            self.schedules.pop(key, None)
            if value is not None:
                try:
                    self.schedules[key] = read_schedule(key, value)
                except UnreadableSchedule as exc:  # left alone until changed or deleted
                    quarantined("kv_schedules", key, str(exc), logger=log)
            self._changed.set()

    def _wake_at(self, schedule: Schedule) -> float | None:
        """When the schedule needs a pass (None: not by the time alone); None also for one
        whose next fire time cannot be computed (a spec stored by hand), reported once."""
        try:
            return self._wake(schedule)
        except (OverflowError, ValueError, NatflowError) as exc:
            reason = f"its next fire time cannot be computed ({exc}); fix or delete it"
            quarantined("kv_schedules", schedule.schedule_id, reason, logger=log)
            return None

    def _wake(self, schedule: Schedule) -> float | None:
        if schedule.paused:
            return None
        retry = self._retry_at.get(schedule.schedule_id)
        if retry is not None:
            return retry
        if schedule.pending:  # the replica that decided starts them; others step in late
            return min(f.at for f in schedule.pending).timestamp() + PENDING_GRACE
        due = next_due(schedule)
        at = None if due is None else due.timestamp()
        if schedule.buffered:
            soon = time.time() + POLL_OPEN_RUNS
            at = soon if at is None else min(at, soon)
        return at

    async def _tick(self) -> None:
        changed = self._changed
        wakes = {sid: self._wake_at(s) for sid, s in self.schedules.items()}
        due = [sid for sid, at in wakes.items() if at is not None and at <= time.time()]
        if not due:
            pending = [at for at in wakes.values() if at is not None]
            delay = min(pending) - time.time() if pending else None
            with anyio.move_on_after(delay):
                await changed.wait()
            if changed.is_set():
                self._changed = anyio.Event()
            return
        async with anyio.create_task_group() as tg:
            for sid in due:
                tg.start_soon(self._pass, sid)

    async def _pass(self, schedule_id: str) -> None:
        self._retry_at.pop(schedule_id, None)
        try:
            schedule, decided = await self._decide(schedule_id)
            if schedule is not None and schedule.pending and (decided or _stale(schedule)):
                await self._start_pending(schedule)
        except (NatflowError, OSError, *UNDECODABLE) as exc:
            log.log(
                level_for("schedule pass"),
                "schedule %s: pass failed (%s); retrying (more such failures within 30 s are "
                "logged at debug)",
                schedule_id,
                exc,
            )
            self._retry_at[schedule_id] = time.time() + RETRY_AFTER
        except Exception:  # never let one schedule stop the others
            log.exception("schedule %s: pass failed; retrying", schedule_id)
            self._retry_at[schedule_id] = time.time() + RETRY_AFTER

    async def _decide(self, schedule_id: str) -> tuple[Schedule | None, bool]:
        """Store the decision for every fire due now; returns the schedule as stored, and
        whether this pass decided anything."""
        for _ in range(_ATTEMPTS):
            found = await get_schedule(self._conn, schedule_id)
            if found is None:
                self.schedules.pop(schedule_id, None)
                return None, False
            schedule, revision = found
            self.schedules[schedule_id] = schedule
            pending = {f.run_id for f in schedule.pending}
            closed = {r for r in schedule.open_runs if await self._closed(r, pending)}
            now = utcnow()
            decided = plan(schedule, now, closed)
            if not decided.changed:
                return schedule, False
            try:
                await put_schedule(self._conn, decided.schedule, revision)
            except ScheduleConflict:
                continue  # another replica (or the user) wrote first: decide again
            self.schedules[schedule_id] = decided.schedule
            for fire in decided.schedule.recent:
                if fire.at == now:  # decided in this pass
                    SCHEDULE_FIRES.labels(fire.action).inc()
            await self._cancel(decided.schedule, decided.cancel)
            return decided.schedule, True
        raise NatflowError(f"schedule {schedule_id!r} kept changing during a pass")

    async def _closed(self, run_id: str, pending: set[str | None]) -> bool:
        last = await self._history.last(run_id)
        if last is None:
            # Started (no longer pending) yet never made: the start joined another run (a
            # singleton's open run, a debounced run; README "Flow control"), which this
            # schedule does not wait for. A pending one is about to be made: still open.
            return run_id not in pending
        return isinstance(last[0], TERMINAL_EVENTS)

    async def _cancel(self, schedule: Schedule, run_ids: list[str]) -> None:
        kind = TERMINATE if schedule.spec.overlap == "terminate_other" else CANCEL
        reason = msgspec.json.encode(f"schedule {schedule.schedule_id}: a newer fire replaces it")
        for run_id in run_ids:
            await send(self._conn, run_id, kind, reason, f"{run_id}-{kind[1:]}-by-schedule")

    async def _start_pending(self, schedule: Schedule) -> None:
        started: list[ScheduleFire] = []
        made: dict[str | None, str] = {}  # fire's run id -> the run that does the work
        for fire in schedule.pending:
            made[fire.run_id] = await self._start(schedule, fire)
            started.append(fire)
        done = {fire.run_id for fire in started}
        for _ in range(_ATTEMPTS):
            found = await get_schedule(self._conn, schedule.schedule_id)
            if found is None:
                return
            current, revision = found
            left = [f for f in current.pending if f.run_id not in done]
            if len(left) == len(current.pending):
                return  # another replica cleared them
            # A singleton's or debounced workflow's start names another run than the fire's:
            # the overlap policy waits for that one.
            changed = msgspec.structs.replace(
                current, pending=left, open_runs=[made.get(r, r) for r in current.open_runs]
            )
            try:
                await put_schedule(self._conn, changed, revision)
            except ScheduleConflict:
                continue
            self.schedules[schedule.schedule_id] = changed
            return

    async def _start(self, schedule: Schedule, fire: ScheduleFire) -> str:
        """Start the fire's run; returns the run doing the work (another id when the
        workflow is a singleton or debounced)."""
        assert fire.run_id is not None
        run_id, created = await start_declared(  # with the workflow's flow control
            self._runs,
            schedule.workflow,
            schedule.spec.queue,
            bytes(schedule.input),
            fire.run_id,
            trigger=Trigger(
                kind="schedule", schedule=schedule.schedule_id, fire_time=fire.fire_time
            ),
        )
        if created:
            self.started += 1
            late = (utcnow() - due_at(schedule, fire.fire_time)).total_seconds()
            self.lateness.append(late)
            SCHEDULE_LATENESS.observe(max(0.0, late))
            del self.lateness[:-1000]
            log.info(
                "schedule %s: started run %s for %s (%.3f s after the fire time)",
                schedule.schedule_id,
                run_id,
                fire.fire_time.isoformat(),
                late,
                extra=fields(run_id, schedule.workflow),
            )
        elif run_id != fire.run_id:
            log.info(
                "schedule %s: the fire at %s joined open run %s (flow control)",
                schedule.schedule_id,
                fire.fire_time.isoformat(),
                run_id,
                extra=fields(run_id, schedule.workflow),
            )
        return run_id


def _stale(schedule: Schedule) -> bool:
    """True when a decided start has waited past the grace (its replica died, or failed)."""
    oldest = min(f.at for f in schedule.pending)
    return (utcnow() - oldest).total_seconds() >= PENDING_GRACE
