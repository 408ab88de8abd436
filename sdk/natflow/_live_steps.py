"""A live run's steps: launched on the driver's task group, contained, and recorded.

A step's task sends what happened (``StillRunning``, ``Finished``) to the driver, which
records it here: a step started long ago, a failed attempt that is retried on a durable
timer, or the step's outcome. A failure is delivered to the workflow once it is in history;
a result is delivered first and recorded before anything the workflow does with it (see
``RunRecorder.hold_last``).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from natflow_engine import (
    STEP_RETRIES,
    STEPS,
    error_info,
    fields,
    labelled,
    quarantined,
)
from natflow_engine.events import StepCompleted, StepFailed, StepRetrying, StepStarted, utcnow

from ._commands import Finished, Item, StepCommand, StillRunning
from ._record_bounds import bounded
from ._recorder import RunRecorder
from ._steps import StepRuntime, rate_fields, run_step
from ._tracing import RunTrace
from ._watchdog import running_step

log = logging.getLogger("natflow.worker")


class LiveSteps:
    """The steps of one live run.

    Attributes:
        send: Where step tasks send what happened; set once the run is live.
        inflight: Steps launched whose outcome is not recorded yet.
    """

    __slots__ = ("_rec", "_runtime", "_trace", "inflight", "send")

    def __init__(self, rec: RunRecorder, runtime: StepRuntime, trace: RunTrace) -> None:
        self._rec = rec
        self._runtime = runtime
        self._trace = trace
        self.send: MemoryObjectSendStream[Item] | None = None
        self.inflight = 0

    def launch(self, tg: anyio.abc.TaskGroup) -> None:
        """Start each step the workflow issued since the last launch."""
        assert self.send is not None
        for command in self._rec.state.take_launches():
            self.inflight += 1
            tg.start_soon(self._contained_step, command, name=f"step {command.name}")

    async def _contained_step(self, command: StepCommand) -> None:
        """Run a step; a ``BaseException`` from its body (``SystemExit``, ``KeyboardInterrupt``
        or another) becomes the step's recorded failure instead of the worker's exit."""
        assert self.send is not None
        rec = self._rec
        await rec.claim_sent()
        started_at = utcnow()
        try:
            with running_step(rec.run_id, command.name):
                await run_step(
                    command,
                    self.send,
                    rec.conn,
                    self._runtime,
                    rec.run_id,
                    self._trace.traced,
                )
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is None or task.cancelling():  # a real cancellation: let it through
                raise
            self._contain(command, started_at, exc)  # raised by the step's own code
        except BaseException as exc:  # user code (or its error's str()) must not end the worker
            self._contain(command, started_at, exc)

    def _contain(self, command: StepCommand, started_at: datetime, exc: BaseException) -> None:
        """Record what a step's code raised beyond ``Exception`` as the step's failure."""
        assert self.send is not None
        quarantined(
            "user_base_exception",
            f"run {self._rec.run_id} step {command.name!r}",
            f"the step raised {type(exc).__name__}; recorded as its failure",
            logger=log,
        )
        self.send.send_nowait(Finished(command, command.attempt, started_at, error=error_info(exc)))

    async def finished(self, item: Finished) -> None:
        """Record a step attempt's end: its outcome, or the failure of an attempt retried."""
        if item.retry_at is not None:
            await self._record_retry(item, item.retry_at)
            return
        rec, state = self._rec, self._rec.state
        outcome = self._outcome_event(item)
        if isinstance(outcome, StepCompleted):
            # Delivered first: a workflow that returns now has this outcome recorded with its
            # end, in one append (RunRecorder.hold_last says why the order still holds).
            held = rec.hold_last(outcome)
            self.inflight -= 1
            self._count_step(held)
            state.deliver(held)
            assert state.root is not None
            if not state.root.done():
                await rec.append_held()  # it goes on: recorded before anything it asks for
            return
        event = await rec.append(outcome)
        self.inflight -= 1
        assert isinstance(event, StepCompleted | StepFailed)
        self._count_step(event)
        state.deliver(event)

    async def still_running(self, item: StillRunning) -> None:
        """Record that a step started (it has run, or waited for its rate, long enough)."""
        rec = self._rec
        await rec.append(
            StepStarted(
                id=rec.next_id(),
                at=utcnow(),
                seq=item.command.seq,
                name=item.command.name,
                occurrence=item.command.occurrence,
                attempt=item.attempt,
                started_at=item.started_at,
                **rate_fields(item),
            )
        )

    async def _record_retry(self, item: Finished, retry_at: datetime) -> None:
        """A failed attempt goes into history with the time of the next one, which waits on
        a durable timer like a sleep (the run is let go if it is far off)."""
        rec = self._rec
        cmd = item.command
        assert item.error is not None
        retrying = await rec.append(
            StepRetrying(
                id=rec.next_id(),
                at=utcnow(),
                seq=cmd.seq,
                name=cmd.name,
                occurrence=cmd.occurrence,
                attempt=item.attempt,
                started_at=item.started_at,
                error=item.error,
                retry_at=retry_at,
            )
        )
        assert isinstance(retrying, StepRetrying)
        self.inflight -= 1
        STEP_RETRIES.labels(rec.workflow_name, cmd.name).inc()
        log.warning(
            "run %s: step %r attempt %d failed (%s); attempt %d at %s",
            rec.run_id,
            cmd.name,
            item.attempt,
            item.error,
            item.attempt + 1,
            retry_at.isoformat(),
            extra=fields(rec.run_id, rec.workflow_name, cmd.name, attempt=item.attempt),
        )
        rec.state.retrying(retrying)

    def _count_step(self, event: StepCompleted | StepFailed) -> None:
        rec = self._rec
        if isinstance(event, StepCompleted):
            labelled(STEPS, rec.workflow_name, event.name, "completed").inc()
            return
        labelled(STEPS, rec.workflow_name, event.name, "failed").inc()
        log.warning(
            "run %s: step %r failed (attempt %d): %s: %s",
            rec.run_id,
            event.name,
            event.attempt,
            event.error.type,
            event.error.message,
            extra=rec.fields(event.name),
        )

    def _outcome_event(self, item: Finished) -> StepCompleted | StepFailed:
        cmd = item.command
        common: dict[str, Any] = {
            "id": self._rec.next_id(),
            "at": utcnow(),
            "seq": cmd.seq,
            "name": cmd.name,
            "occurrence": cmd.occurrence,
            "attempt": item.attempt,
            "started_at": item.started_at,
        }
        if item.error is not None:
            return StepFailed(**common, error=bounded(item.error))
        assert item.result is not None
        return StepCompleted(**common, result=msgspec.Raw(item.result))
