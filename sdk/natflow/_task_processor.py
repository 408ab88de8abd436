"""Processing one task: from the run's history to its execution here, and the task's end.

A task is only a hint to look: history is the truth. The processor reads the run's history
(claiming a new run beside the read where it may), checks that the run is one this worker
should drive now (not closed, served here, not quarantined, not held by a live worker, not
still being restarted, due), admits it against its workflow's limits, executes it with its
lease taken beside the first steps, and ends the task as the outcome says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from natflow_engine import (
    EXECUTIONS,
    Connection,
    CorruptHistory,
    History,
    HistoryStore,
    Task,
    fold_run,
    labelled,
    load_events,
    one_error,
    open_events,
    quietly,
    start_history,
)
from natflow_engine.events import Event, RestartSeeded, RunStarted, utcnow
from nats.aio.msg import Msg

from ._admission import Admitter
from ._execution import HOLD_TIMERS_UNDER, Outcome, RunExecution
from ._guard import RunGuard, check_inline_start
from ._held import Held
from ._key_waits import KeyWaits
from ._preclaim import ClaimAhead, Preclaim, inline_start, read_and_claim
from ._run_leases import RunLeases
from ._steps import StepRuntime
from ._task_endings import MISSING_KEY_DELAY, TaskEndings
from ._unseen import read_until_seen, vouches_for_start
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

_UNKNOWN_WORKFLOW_DELAY = 1.0
_BLOCKED_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)
_UNSEEN_START_TRIES = 5


def _seeded(events: list[Event]) -> bool:
    """Whether a restarted run's copied history is complete (``restart_seeded`` written)."""
    return any(isinstance(event, RestartSeeded) for event in events)


class TaskProcessor:
    """Drives the run a held task names, for one worker.

    Args:
        workflows: The workflows the worker serves, by name.
        conn: The worker's connection.
        store: The history store (the worker's own: one per worker).
        identity: The worker's identity (its claims name it).
        runtime: Where step bodies run (the worker's bound on steps at once).
        guard: The worker's quarantine and its look at other holders.
        admitter: Admits runs of limited workflows into their concurrency slots.
        leases: The leases of the runs the worker holds (and its lease period).
        endings: Ends tasks that do not simply finish here.
        stopping: Set once the worker stops taking work (its runs then drain).
        busy: Whether the worker holds other runs than the one at hand (see ``_preclaim``:
            a busy worker claims a new run before its first steps, an idle one beside them).
    """

    def __init__(
        self,
        *,
        workflows: dict[str, Workflow],
        conn: Connection,
        store: HistoryStore,
        identity: str,
        runtime: StepRuntime,
        guard: RunGuard,
        admitter: Admitter,
        leases: RunLeases,
        endings: TaskEndings,
        stopping: anyio.Event,
        busy: Callable[[], bool],
    ) -> None:
        self._workflows = workflows
        self._conn = conn
        self._store = store
        self._identity = identity
        self._runtime = runtime
        self._guard = guard
        self._admitter = admitter
        self._leases = leases
        self._endings = endings
        self._stopping = stopping
        self._busy = busy
        self.key_waits = KeyWaits()  # runs handed back for a signal's missing key

    async def process(self, held: Held, task: Task) -> None:
        """Drive the run ``task`` names as far as it goes here, then end the task."""
        msg, run_id = held.msg, held.run_id
        read = await self._read(held, msg, task)
        if read is None:
            return
        history, preclaimed = read
        if preclaimed is None and self.key_waits.still_waiting(run_id, history.last_seq):
            await self._endings.hand_back(held, delay=MISSING_KEY_DELAY, quiet=True)
            return
        ready = await self._ready(held, msg, history, task)
        if ready is None:
            return
        workflow, start = ready
        admission = None
        if workflow.limits:  # only then: a workflow without limits touches no slot
            admission = await self._admitter.admit(workflow, start, run_id, msg)
            if admission is None:
                return  # it waits for a slot; the engine enqueues it when one is granted
            held.admission = admission  # given back by the worker if this ends in an error
        delivered = msg.metadata.num_delivered or 1
        held.execution = RunExecution(
            workflow=workflow,
            history=history,
            store=self._store,
            conn=self._conn,
            identity=self._identity,
            runtime=self._runtime,
            delivery=delivered,
            preclaimed=preclaimed,
        )
        if held.nudged:  # a nudge that came while the execution was being built
            held.execution.signals_arrived()
        if self._stopping.is_set():
            held.execution.drain()
        if isinstance(preclaimed, Preclaim):  # leased (and looked) beside the claim already
            outcome = await held.execution.execute()
        else:
            with one_error():  # the worker branches on the error (transient: handed back)
                async with anyio.create_task_group() as tg:
                    # The lease makes ownership visible and lets the engine hand the run back
                    # if this process dies; the claim append is the fence. Neither waits for
                    # the other.
                    tg.start_soon(self._leases.take_and_look, held)
                    outcome = await held.execution.execute()
        if admission is not None and outcome is not Outcome.STALE:  # STALE: admitted anew
            lost = outcome is Outcome.LOST or held.lost
            # A run that waits for a child lets its slots go, kept or not: the child may need
            # one of them (a parent keeping the only slot its child waited for stalled both).
            waiting = outcome is Outcome.SUSPENDED and not held.execution.state.open_children()
            await self._admitter.settle(admission, waiting=waiting, lost=lost)
        labelled(EXECUTIONS, workflow.name, outcome.value).inc()
        await self._conclude(held, msg, task, held.execution, outcome, delivered)

    async def _read(
        self, held: Held, msg: Msg, task: Task
    ) -> tuple[History, Preclaim | ClaimAhead | None] | None:
        """The run's history, opened for replay, and its claim: written beside the read, or
        to be written beside the first steps (None: the execution claims the run); None if
        the history does not decode (the run is then held as corrupt)."""
        run_id = held.run_id
        # History is the truth: a task is only a hint to look. Its inline start (if any)
        # is checked against history and never used in its place.
        preclaimed: Preclaim | ClaimAhead | None = None
        inline = inline_start(task, msg.metadata.num_delivered or 1)
        try:
            # Claimed early only where nothing may stand between the read and the claim: a
            # run of a limited workflow may have to wait for a slot first, unclaimed.
            served = self._workflows.get(inline.workflow) if inline is not None else None
            if served is None or served.limits or self._stopping.is_set():
                history = await self._store.read(run_id)
            else:
                # From a start consumer the delivery is the stored start itself (None for a
                # task, a hint whose start is looked up), and the task's inline start is that
                # very message (``start_task``), decoded already.
                stored = start_history(
                    run_id, msg.subject, msg.data, task.start_seq, decoded=inline
                )
                if stored is not None and not self._busy():
                    history, preclaimed = stored, ClaimAhead()  # claimed beside its steps
                else:
                    history, preclaimed = await read_and_claim(
                        self._store,
                        self._conn,
                        run_id,
                        task.start_seq,
                        self._identity,
                        lambda: self._leases.take(held),
                        stored=stored,
                    )
            if not history.events and vouches_for_start(task):
                history = await read_until_seen(self._store, run_id, history)
        except CorruptHistory as bad:
            await self._endings.hold_corrupt(held, bad)
            return None
        if task.start_seq > 0:
            check_inline_start(task, history, inline)
        # Sealed values opened for replay: without the key, MissingKey names it and the task
        # goes back untouched for a worker that holds it.
        # Large values read back from the object store first (they are stored sealed).
        history.events = await load_events(self._conn, history.events, run_id)
        history.events = open_events(self._conn.codec, history.events, run_id)
        return history, preclaimed

    async def _ready(
        self, held: Held, msg: Msg, history: History, task: Task
    ) -> tuple[Workflow, RunStarted] | None:
        """The run's workflow and start if this worker is to drive it now; else None, with
        the task ended (acknowledged, NAKed to look again later, or dropped)."""
        run_id = held.run_id
        info = fold_run(run_id, history.events)
        if info is None:
            if vouches_for_start(task) and (msg.metadata.num_delivered or 1) < _UNSEEN_START_TRIES:
                # a start the task vouches for, read from a replica not there yet
                await quietly(msg.nak(delay=_UNKNOWN_WORKFLOW_DELAY))
                return None
            log.warning("task for unknown run %s; dropping it", run_id)
            await quietly(msg.term())
            return None
        if info.is_closed:
            await quietly(msg.ack())
            return None
        workflow = self._workflows.get(info.workflow)
        if workflow is None:
            log.debug("run %s: workflow %r is not served here", run_id, info.workflow)
            await quietly(msg.nak(delay=_UNKNOWN_WORKFLOW_DELAY))
            return None
        if await self._endings.held_in_quarantine(held, history):
            return None
        if await self._guard.held_elsewhere(run_id, info.worker):
            # A task is no permission to take a run from a live holder: not a redelivery (a
            # consumer leader change, an ack deadline missed in an election), nor a first
            # delivery whose claim beside the read met the claim of a worker that got the
            # redelivery meanwhile, nor a wake-up for a run its holder still has in hand.
            # Leave it, look again later. (A new run, or a run last held here, asks no one.)
            await quietly(msg.nak(delay=self._leases.ttl))
            return None
        start = history.events[0]
        assert isinstance(start, RunStarted)
        if start.restarted_from is not None and not _seeded(history.events):
            await quietly(msg.nak(delay=0.5))  # a restart is still copying its history
            return None
        if info.status == "pending" and start.not_before is not None:
            early = (start.not_before - utcnow()).total_seconds()
            if early > HOLD_TIMERS_UNDER:
                await quietly(msg.ack())  # the engine's start timer wakes it on time
                return None
            await anyio.sleep(max(0.0, early))
        return workflow, start

    async def _conclude(
        self,
        held: Held,
        msg: Msg,
        task: Task,
        execution: RunExecution,
        outcome: Outcome,
        delivered: int,
    ) -> None:
        """End the task as the execution's outcome says."""
        if outcome in (Outcome.COMPLETED, Outcome.FAILED, Outcome.CANCELLED):
            log.info(
                "run %s (%s) %s",
                held.run_id,
                execution.workflow.name,
                outcome.value,
                extra=held.execution_fields,
            )
            await quietly(msg.ack())
            await self._leases.release(held)
        elif outcome is Outcome.BLOCKED:
            held.released = True  # before the NAK, as in TaskEndings.hand_back
            await quietly(msg.nak(delay=_BLOCKED_DELAYS[min(delivered, 5) - 1]))
            await self._leases.release(held)
        elif outcome is Outcome.STALE:  # the run moved on since the task was written
            await self.process(held, Task(run_id=held.run_id, workflow=task.workflow))
        elif outcome is Outcome.HANDED_BACK:
            await self._endings.hand_back(held)
        elif outcome is Outcome.SUSPENDED:
            await self._endings.suspend(held, execution)
        elif outcome is Outcome.CONTINUED:  # its next stretch runs as a task of its own
            await self._endings.suspend(held, execution, again=True)
        # LOST: the task and lease now belong to the worker that took the run.
