"""``Worker``: pulls tasks for its queues and drives the runs they name.

A worker only dials out: it pulls from the queue's durable consumer, reads and appends
history, and heartbeats the task messages it holds (``+WPI``) so the consumer's ack
deadline does not hand its runs to another worker while it is alive.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from engine import InvalidInput, NatflowError
from engine._history import HistoryStore
from engine._state import fold_run
from engine._streams import TASK_STREAM, ensure_streams, queue_consumer
from engine._tasks import DEFAULT_ACK_WAIT, decode_task, ensure_consumer

from ._client import Client
from ._execution import Outcome, RunExecution, StepRuntime
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

_FETCH_WAIT = 5.0
_MAX_FETCH = 256
_UNKNOWN_WORKFLOW_DELAY = 1.0
_BLOCKED_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0)


class Worker:
    """Runs workflows from one or more task queues.

    Example::

        async with await Client.connect() as client:
            worker = Worker(client, workflows=[greet, order])
            await worker.run()          # until cancelled or worker.shutdown()

    ``queue=None`` serves every queue the given workflows declare. ``max_concurrent_runs``
    bounds the runs held at once; ``max_concurrent_steps`` (default: unbounded) the step
    bodies running at once.
    """

    def __init__(
        self,
        client: Client,
        workflows: Iterable[Workflow],
        queue: str | None = None,
        max_concurrent_runs: int = 100,
        max_concurrent_steps: int | None = None,
        identity: str | None = None,
        *,
        ack_wait: float = DEFAULT_ACK_WAIT,
    ) -> None:
        self._client = client
        self._workflows: dict[str, Workflow] = {}
        for wf in workflows:
            if not isinstance(wf, Workflow):
                raise InvalidInput(f"{wf!r} is not a workflow; decorate it with @workflow")
            if wf.name in self._workflows and self._workflows[wf.name] is not wf:
                raise InvalidInput(f"two workflows are named {wf.name!r}; names must be unique")
            self._workflows[wf.name] = wf
        if not self._workflows:
            raise InvalidInput("a worker needs at least one workflow")
        if max_concurrent_runs < 1:
            raise InvalidInput("max_concurrent_runs must be at least 1")
        if max_concurrent_steps is not None and max_concurrent_steps < 1:
            raise InvalidInput("max_concurrent_steps must be at least 1 (or None)")
        self.queues = self._pick_queues(queue)
        self.identity = identity or (
            f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self._max_runs = max_concurrent_runs
        self._ack_wait = ack_wait
        self._runtime = StepRuntime(
            limiter=anyio.CapacityLimiter(max_concurrent_steps) if max_concurrent_steps else None
        )
        self._store = HistoryStore(client.connection)
        self._held: dict[str, Msg] = {}
        self._slots = anyio.Semaphore(max_concurrent_runs)
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._runs_scope = anyio.CancelScope()

    def _pick_queues(self, queue: str | None) -> list[str]:
        if queue is None:
            return sorted({wf.queue for wf in self._workflows.values()})
        from engine._names import check_queue

        check_queue(queue)
        for wf in self._workflows.values():
            if wf.queue != queue:
                log.warning(
                    "workflow %r declares queue %r but this worker serves %r: its runs reach "
                    "this worker only when started with queue=%r",
                    wf.name, wf.queue, queue, queue,
                )
        return [queue]

    @property
    def workflows(self) -> dict[str, Workflow]:
        return dict(self._workflows)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or :meth:`shutdown` is called."""
        conn = self._client.connection
        await ensure_streams(conn)
        subs = []
        for queue in self.queues:
            await ensure_consumer(conn, queue, self._ack_wait)
            subs.append(
                await conn.js.pull_subscribe_bind(
                    durable=queue_consumer(queue), stream=TASK_STREAM
                )
            )
        log.info(
            "worker %s serving queues %s with workflows %s",
            self.identity, ", ".join(self.queues), ", ".join(sorted(self._workflows)),
        )
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._heartbeat)
                with self._runs_scope:
                    async with anyio.create_task_group() as runs:
                        async with anyio.create_task_group() as pullers:
                            for sub in subs:
                                pullers.start_soon(self._pull, sub, runs)
                            await self._stopping.wait()
                            pullers.cancel_scope.cancel()
                tg.cancel_scope.cancel()
        finally:
            for sub in subs:
                try:
                    await sub.unsubscribe()
                except Exception:  # connection already gone; the server drops the pull anyway
                    log.debug("unsubscribe failed", exc_info=True)
            self._stopped.set()

    async def shutdown(self, grace: float = 30.0) -> None:
        """Stop taking work; give held runs ``grace`` seconds, then hand the rest back."""
        self._stopping.set()
        with anyio.move_on_after(grace):
            while self._held:
                await anyio.sleep(0.05)
        self._runs_scope.cancel()
        for msg in list(self._held.values()):
            await self._quietly(msg.nak())
        self._held.clear()
        await self._stopped.wait()

    async def __aenter__(self) -> Worker:
        self._outer = anyio.create_task_group()
        await self._outer.__aenter__()
        self._outer.start_soon(self.run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.shutdown(grace=0 if exc is not None else 30.0)
        return await self._outer.__aexit__(exc_type, exc, tb)

    # -- pulling ---------------------------------------------------------------------------

    async def _pull(self, sub: Any, runs: anyio.abc.TaskGroup) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self._slots.value
            if free == 0:
                await self._slots.acquire()
                self._slots.release()
                continue
            try:
                msgs = await sub.fetch(batch=min(free, _MAX_FETCH), timeout=_FETCH_WAIT)
                failures = 0
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                failures += 1
                delay = min(5.0, 0.1 * 2**failures)
                log.warning("fetching tasks failed (%s); retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                continue
            for msg in msgs:
                await self._slots.acquire()
                runs.start_soon(self._handle, msg)

    async def _handle(self, msg: Msg) -> None:
        run_id = "?"
        try:
            try:
                task = decode_task(msg.data)
            except Exception as exc:
                log.error("dropping malformed task on %s: %s", msg.subject, exc)
                await self._quietly(msg.term())
                return
            run_id = task.run_id
            self._held[run_id] = msg
            await self._process(run_id, msg)
        except Exception as exc:
            log.error("run %s: giving it back after an error: %s", run_id, exc, exc_info=True)
            await self._quietly(msg.nak(delay=1.0))
        finally:
            self._held.pop(run_id, None)
            self._slots.release()

    async def _process(self, run_id: str, msg: Msg) -> None:
        history = await self._store.read(run_id)
        info = fold_run(run_id, history.events)
        if info is None:
            log.warning("task for unknown run %s; dropping it", run_id)
            await self._quietly(msg.term())
            return
        if info.is_closed:
            await self._quietly(msg.ack())
            return
        workflow = self._workflows.get(info.workflow)
        if workflow is None:
            log.debug("run %s: workflow %r is not served here", run_id, info.workflow)
            await self._quietly(msg.nak(delay=_UNKNOWN_WORKFLOW_DELAY))
            return
        delivered = msg.metadata.num_delivered or 1
        execution = RunExecution(
            workflow=workflow,
            history=history,
            store=self._store,
            conn=self._client.connection,
            identity=self.identity,
            runtime=self._runtime,
            delivery=delivered,
        )
        outcome = await execution.execute()
        if outcome in (Outcome.COMPLETED, Outcome.FAILED):
            await self._quietly(msg.ack())
        elif outcome is Outcome.BLOCKED:
            delay = _BLOCKED_DELAYS[min(delivered, len(_BLOCKED_DELAYS)) - 1]
            await self._quietly(msg.nak(delay=delay))
        # LOST: the task message now belongs to the worker that took the run; leave it alone.

    async def _heartbeat(self) -> None:
        interval = max(0.2, self._ack_wait / 3)
        while True:
            await anyio.sleep(interval)
            for msg in list(self._held.values()):
                await self._quietly(msg.in_progress())

    async def _quietly(self, op: Any) -> None:
        try:
            await op
        except (nats.errors.Error, NatflowError, OSError) as exc:
            log.debug("acknowledgement failed: %s", exc)

