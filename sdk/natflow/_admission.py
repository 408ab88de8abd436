"""Admission: a run of a workflow with concurrency limits takes a slot of each before it runs.

The worker calls :meth:`Admitter.admit` when it has read the run and before it claims it.
For each of the workflow's limits in order (see :func:`natflow._limit.bind_limits`) the
run keeps a slot that already names it (granted by the engine, kept while it waited, or
left by a worker that lost it) or takes a free one, unless runs wait in line for that limit
and key (the engine's queue mark; they go first): one read per limit either way. When it
can take none it waits: it is put on the limit's wait list, its task is acknowledged, and
the engine's limit service enqueues it again once it grants it a slot. A workflow without
limits never gets here: no KV access at all.

A run asked to cancel or terminate goes on without waiting (its cleanup is not held up
behind the queue). Slots are given back when the run closes, blocks, is handed back, or
lets go to wait for a timer or a signal (unless its limit holds slots while waiting).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
from natflow_engine import (
    InvalidInput,
    LimitGroup,
    NatflowError,
    Slot,
    Task,
    Waiter,
    decode_value,
    enqueue,
    free_slot,
    park,
    put_slot,
    read_group,
    stopping,
)
from natflow_engine.events import RunContinued, RunStarted, utcnow
from nats.aio.msg import Msg

from ._limit import BoundLimit
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

_TAKE_TRIES = 5  # conflicting takes of a free slot before the run waits in line instead


@dataclass
class _Holding:
    bound: BoundLimit
    group: LimitGroup
    n: int
    slot: Slot
    revision: int


@dataclass
class Admission:
    """The slots one run holds on this worker."""

    holdings: list[_Holding] = field(default_factory=list)
    settled: bool = False


@dataclass(frozen=True)
class _Target:
    bound: BoundLimit
    group: LimitGroup
    label: str


class Admitter:
    """Takes and gives back the concurrency slots of the runs a worker holds."""

    def __init__(self, conn: Any, identity: str) -> None:
        self._conn = conn
        self._identity = identity

    async def admit(
        self, workflow: Workflow, start: RunStarted, run_id: str, msg: Msg
    ) -> Admission | None:
        """Take a slot of each of the workflow's limits; None when the run has to wait (it
        is then on a wait list and its task acknowledged)."""
        targets = self._targets(workflow, start, run_id)
        admission = Admission()
        for target in targets:
            holding = await self._take(target, start, run_id)
            if holding is None and await stopping(self._conn, run_id):
                log.info("run %s: asked to stop or pause; goes on without a slot", run_id)
                return admission
            if holding is None:
                await self._wait(workflow, start, run_id, msg, target, targets, admission)
                return None
            admission.holdings.append(holding)
        return admission

    def _targets(self, workflow: Workflow, start: RunStarted, run_id: str) -> list[_Target]:
        try:
            value = decode_value(f"input of run {run_id!r}", start.input, workflow.input_type)
        except InvalidInput:
            value = None  # the run fails on its input once it runs; keyed as ""
        targets = []
        for bound in workflow.limits:
            try:
                group, label = bound.group(start.queue, value)
            except InvalidInput as exc:  # only a keyed limit fails so
                log.warning("run %s: %s; counted under the key ''", run_id, exc)
                group = LimitGroup(bound.limit_id(start.queue), "")
                label = f"{bound.key_name}="
            targets.append(_Target(bound, group, label))
        return targets

    async def _take(self, target: _Target, start: RunStarted, run_id: str) -> _Holding | None:
        group, max_ = target.group, target.bound.limit.max
        for _ in range(_TAKE_TRIES):
            view = await read_group(self._conn, group)
            mine = view.slots.of_run(run_id)
            if mine and mine[0][0] >= max_:
                # Granted under a larger max than the code deployed now declares (the limit
                # was lowered while runs waited): given back, and the run waits (or takes a
                # slot within the new max), so the new max holds at once.
                for n, _slot, revision in mine:
                    await free_slot(self._conn, group, n, revision)
                continue
            if mine:
                n, slot, revision = mine[0]
                for extra, _slot, extra_rev in mine[1:]:  # granted twice in a race
                    await free_slot(self._conn, group, extra, extra_rev)
                # Rewritten even when it names this worker already: a give-back of it
                # still on its way (fire and forget) then misses instead of freeing it.
                # With this code's max: the engine grants by the max it last saw (one
                # raised while runs waited lets more of them in).
                slot = msgspec.structs.replace(
                    slot, worker=self._identity, state="held", at=utcnow(), max=max_
                )
                new = await put_slot(self._conn, group, n, slot, revision)
                if new is None:
                    continue
                return _Holding(target.bound, group, n, slot, new)
            free = view.slots.free(max_)
            if not free or view.queued:
                return None  # full, or runs wait in line: they go first
            n = random.choice(free)  # takers that read at once mostly pick different slots
            slot = Slot(
                run_id=run_id,
                worker=self._identity,
                limit=group.limit,
                key=group.key,
                label=target.label,
                max=max_,
                workflow=start.workflow,
                queue=start.queue,
                at=utcnow(),
            )
            new = await put_slot(self._conn, group, n, slot, view.slots.revisions.get(n, 0))
            if new is not None:
                return _Holding(target.bound, group, n, slot, new)
        return None

    async def _wait(
        self,
        workflow: Workflow,
        start: RunStarted,
        run_id: str,
        msg: Msg,
        target: _Target,
        targets: list[_Target],
        admission: Admission,
    ) -> None:
        """Join the wait list of ``target``; keep the slots already taken (marked ``kept``,
        so this worker's death does not free them) and let the run go."""
        for holding in admission.holdings:
            await self._keep(holding)
        fair = "|".join(t.group.key for t in targets if t.bound.key_name is not None)
        priority = start.priority if start.priority is not None else workflow.priority
        # A continued run keeps its place: it has waited since the run began.
        began = start.run_started_at if isinstance(start, RunContinued) else None
        waiter = Waiter(
            run_id=run_id,
            workflow=start.workflow,
            queue=start.queue,
            limit=target.group.limit,
            key=target.group.key,
            label=target.label,
            max=target.bound.limit.max,
            priority=priority,
            since=began or start.at,
            fair=fair,
            at=utcnow(),
        )
        await park(self._conn, target.group, waiter)
        try:
            await msg.ack_sync(timeout=5)
        except Exception as exc:  # the task comes back by itself: admission is repeated
            log.debug("run %s: ack failed (%s)", run_id, exc)
            return
        # A slot granted between the wait list entry and the acknowledgement met the task
        # still in flight, so its wake-up was refused: look once more (NATS.md §8).
        view = await read_group(self._conn, target.group)
        if view.slots.of_run(run_id):
            await enqueue(self._conn, start.queue, Task(run_id=run_id, workflow=start.workflow))
        log.debug("run %s: waits for a slot of limit %s", run_id, target.label)

    async def _keep(self, holding: _Holding) -> None:
        slot = msgspec.structs.replace(holding.slot, worker="", state="kept", at=utcnow())
        new = await put_slot(self._conn, holding.group, holding.n, slot, holding.revision)
        if new is not None:
            holding.slot, holding.revision = slot, new

    async def settle(self, admission: Admission, *, waiting: bool, lost: bool) -> None:
        """Give the run's slots back once it stops executing here: all of them, but when it
        only waits (``waiting``), those of limits that hold slots while waiting are kept;
        none when another worker took the run (``lost``: it holds them now)."""
        if admission.settled:
            return
        admission.settled = True
        if lost:
            return
        for holding in admission.holdings:
            try:
                if waiting and holding.bound.limit.hold_while_waiting:
                    await self._keep(holding)
                else:
                    await free_slot(self._conn, holding.group, holding.n, holding.revision)
            except NatflowError as exc:  # the engine frees it when the run closes
                log.warning("could not give back slot of limit %s: %s", holding.slot.label, exc)
