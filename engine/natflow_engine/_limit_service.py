"""The limit service: grants freed concurrency slots to waiting runs, in order.

Each engine replica watches the ``natflow_limits`` bucket (see ``_limits``) and keeps, per
limit and key, the slots and a :class:`~natflow_engine._waitlist.Waitlist`. Whenever a
group has a free slot and a waiter, it writes the slot naming the best waiter (a
conditional create: of two replicas granting one slot, one wins), drops the waiter entry
and enqueues the run's task; the worker that takes the task finds the slot granted and
runs the run. It also frees slots that nobody will release:

* those of a worker the reaper found dead (:meth:`reap`, within the reaper's ~0.5 s);
* those of a run that closed (:meth:`run_closed`, from the dispatcher), in case its
  worker died between closing the run and releasing them;
* it re-enqueues a run whose granted slot was not taken up within a few seconds (a
  wake-up refused because the run's task was still in flight, or a replica that died
  between granting and enqueueing), and frees a granted or kept slot whose run has closed
  (a wait list entry that outlived its run).
"""

from __future__ import annotations

import logging
import time
from typing import Final

import anyio

from ._connection import Connection
from ._errors import NatflowError
from ._history import CorruptHistory, HistoryStore
from ._kv import kv_delete_nowait, kv_watch
from ._limits import (
    LIMITS_BUCKET,
    Group,
    Slot,
    decode_slot,
    decode_waiter,
    mark_queued,
    put_slot,
    read_slots,
    unpark,
)
from ._tasks import Task, enqueue
from ._undecodable import UNDECODABLE
from ._waitlist import Waitlist
from .events import TERMINAL_EVENTS, utcnow

log = logging.getLogger("natflow.limits")

AUDIT_INTERVAL: Final = 1.0
GRANT_PICKUP: Final = 3.0  # seconds a granted slot may wait for its run before a re-enqueue
# Seconds after which a granted slot no worker took up goes back to the line: a run of a
# paused queue, or of one whose workers are gone, kept a shared limit's slot for good.
GRANT_TAKEBACK: Final = 60.0


class _Group:
    """What this replica knows of one limit and key."""

    def __init__(self) -> None:
        self.group: Group | None = None  # learned from the first value seen
        self.max = 0
        self.slots: dict[int, tuple[Slot | None, int]] = {}  # n -> (holder or None, revision)
        self.waitlist = Waitlist()
        self.queued = False  # whether the group's queue mark is set (as last seen or written)


class LimitService:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._groups: dict[str, _Group] = {}
        self._dirty: set[str] = set()
        self._changed = anyio.Event()
        self._nudged: dict[tuple[str, int], float] = {}
        self._runs: dict[str, set[str]] = {}  # run id -> groups it held or waited in
        self._history = HistoryStore(conn)
        self.granted = 0

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._grant_forever)
            tg.start_soon(self._audit_forever)
            async for key, value, revision in kv_watch(self._conn, LIMITS_BUCKET):
                try:
                    self._apply(key, value, revision)
                except (*UNDECODABLE, ValueError) as exc:
                    log.warning("limits entry %s set aside: %s", key, exc)

    def _apply(self, key: str, value: bytes | None, revision: int) -> None:
        kind, ltok, ktok, *rest = key.split(".", 3)
        last = rest[0] if rest else ""
        token = f"{ltok}.{ktok}"
        state = self._groups.setdefault(token, _Group())
        if kind == "q":
            state.queued = value is not None
        elif kind == "s":
            n = int(last)
            if revision < state.slots.get(n, (None, 0))[1]:
                return  # older than what a fresh read already told this replica
            slot = decode_slot(value) if value is not None else None
            state.slots[n] = (slot, revision)
            if slot is not None:
                state.group = Group(slot.limit, slot.key)
                state.max = slot.max
                self._runs.setdefault(slot.run_id, set()).add(token)
        elif kind == "w":
            if value is None:
                state.waitlist.discard(last)
            else:
                waiter = decode_waiter(value)
                state.group = Group(waiter.limit, waiter.key)
                state.max = waiter.max
                state.waitlist.add(waiter)
                self._runs.setdefault(waiter.run_id, set()).add(token)
        self._dirty.add(token)
        self._changed.set()

    async def _grant_forever(self) -> None:
        while True:
            await self._changed.wait()
            self._changed = anyio.Event()
            dirty, self._dirty = self._dirty, set()
            for token in dirty:
                try:
                    await self._grant(token)
                except NatflowError as exc:
                    log.warning("could not grant slots (%s); trying again", exc)
                    self._dirty.add(token)
                    await anyio.sleep(0.5)
                    self._changed.set()

    async def _grant(self, token: str) -> None:
        state = self._groups.get(token)
        if state is None or state.group is None:
            return
        try:
            await self._grant_in(state, state.group)
        finally:
            if state.queued != bool(len(state.waitlist)):  # the line formed or emptied
                state.queued = bool(len(state.waitlist))
                await mark_queued(self._conn, state.group, state.queued)

    async def _grant_in(self, state: _Group, group: Group) -> None:
        conflicts = 0
        while len(state.waitlist):
            free = [n for n in range(state.max) if state.slots.get(n, (None, 0))[0] is None]
            if not free:
                return  # every slot taken: the next release brings this group back here
            waiter = state.waitlist.next()
            if waiter is None:
                return
            if any(s is not None and s.run_id == waiter.run_id for s, _ in state.slots.values()):
                state.waitlist.served(waiter)  # it took a slot itself meanwhile
                await unpark(self._conn, group, waiter.run_id)
                continue
            n = free[0]
            slot = Slot(
                run_id=waiter.run_id,
                state="granted",
                limit=waiter.limit,
                key=waiter.key,
                label=waiter.label,
                max=waiter.max,
                workflow=waiter.workflow,
                queue=waiter.queue,
                at=utcnow(),
            )
            revision = await put_slot(self._conn, group, n, slot, state.slots.get(n, (None, 0))[1])
            if revision is None:  # taken meanwhile, or this view is behind: read it afresh
                conflicts += 1
                if conflicts > 3:
                    return  # the watch brings the newer entries, and a new look
                await self._refresh(state, group)
                continue
            state.slots[n] = (slot, revision)
            state.waitlist.served(waiter)
            self.granted += 1
            await unpark(self._conn, group, waiter.run_id)
            await self._wake(waiter.run_id, waiter.workflow, waiter.queue)
            log.debug("run %s: granted slot %d of limit %s", waiter.run_id, n, waiter.label)

    async def _refresh(self, state: _Group, group: Group) -> None:
        fresh = await read_slots(self._conn, group)
        for n, revision in fresh.revisions.items():
            if revision >= state.slots.get(n, (None, 0))[1]:
                holder = fresh.held.get(n)
                state.slots[n] = (holder[0] if holder else None, revision)

    async def _wake(self, run_id: str, workflow: str, queue: str) -> None:
        await enqueue(self._conn, queue, Task(run_id=run_id, workflow=workflow, reason="slot"))

    async def _audit_forever(self) -> None:
        while True:
            await anyio.sleep(AUDIT_INTERVAL)
            try:
                await self._audit()
            except NatflowError as exc:
                log.debug("limits audit failed: %s", exc)

    async def _audit(self) -> None:
        """Re-enqueue runs whose granted slot was not taken up (their wake-up met their own
        task still in flight, or the granting replica died before enqueueing); free slots
        not held by a worker whose run has closed; forget groups with nothing in them."""
        now = time.monotonic()
        for token, state in list(self._groups.items()):
            empty = all(s is None for s, _ in state.slots.values())
            if not len(state.waitlist) and empty and not state.queued:
                del self._groups[token]  # a later grant reads its revisions afresh
                continue
            for n, (slot, revision) in list(state.slots.items()):
                if slot is None or slot.state == "held":
                    self._nudged.pop((token, n), None)
                    continue
                age = (utcnow() - slot.at).total_seconds()
                last = self._nudged.get((token, n), 0.0)
                if age < GRANT_PICKUP or now - last < GRANT_PICKUP:
                    continue
                self._nudged[(token, n)] = now
                # A kept slot is the run's while it sleeps or waits, however long (taken
                # back at a minute, a 90 s sleep lost its slot to the next run in line).
                overdue = slot.state == "granted" and age >= GRANT_TAKEBACK
                if overdue or await self._closed(slot.run_id):
                    # Taken back: the run, once a worker has it, waits in line again.
                    assert state.group is not None
                    if overdue:
                        log.info(
                            "run %s: no worker took up its slot of limit %s in %.0f s (its "
                            "queue %s paused, or no worker serves it); the slot goes on",
                            slot.run_id,
                            slot.label,
                            age,
                            slot.queue,
                        )
                    await kv_delete_nowait(
                        self._conn, LIMITS_BUCKET, state.group.slot_key(n), revision=revision
                    )
                elif slot.state == "granted":
                    await self._wake(slot.run_id, slot.workflow, slot.queue)

    async def _closed(self, run_id: str) -> bool:
        """Whether the run has ended (or is gone): its last event closes it."""
        try:
            last = await self._history.last(run_id)
        except CorruptHistory:
            return False  # a worker holds it as blocked; its slots go when it is let go
        return last is None or isinstance(last[0], TERMINAL_EVENTS)

    async def reap(self, worker: str) -> int:
        """Free the slots a dead worker held (called by the reaper)."""
        freed = 0
        for state in list(self._groups.values()):
            for n, (slot, revision) in list(state.slots.items()):
                if slot is not None and slot.worker == worker and slot.state == "held":
                    assert state.group is not None
                    await kv_delete_nowait(
                        self._conn, LIMITS_BUCKET, state.group.slot_key(n), revision=revision
                    )
                    freed += 1
        if freed:
            log.info("freed %d concurrency slots of worker %s, which is gone", freed, worker)
        return freed

    def waiting(self, run_id: str) -> bool:
        """Whether the run is on a wait list (as this replica's watch has seen so far)."""
        return any(
            run_id in self._groups[token].waitlist
            for token in self._runs.get(run_id, ())
            if token in self._groups
        )

    async def run_closed(self, run_id: str) -> None:
        """Free whatever a closed run still holds or waits for (called by the dispatcher)."""
        for token in self._runs.pop(run_id, ()):
            state = self._groups.get(token)
            if state is None or state.group is None:  # forgotten by the audit: nothing held
                continue
            if run_id in state.waitlist:
                state.waitlist.discard(run_id)
                await unpark(self._conn, state.group, run_id)
            for n, (slot, revision) in list(state.slots.items()):
                if slot is not None and slot.run_id == run_id:
                    await kv_delete_nowait(
                        self._conn, LIMITS_BUCKET, state.group.slot_key(n), revision=revision
                    )
