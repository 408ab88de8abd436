"""``Worker``: pulls tasks for its queues and drives the runs they name.

A worker only dials out. It pulls from each queue's durable consumer, reads and appends
history, and for every run it holds keeps two clocks running on one heartbeat: the task's
ack deadline (``+WPI``) and the run's lease in KV (a revision-checked renewal). It answers
pings on ``natflow.worker.<identity>.ping`` so the engine notices its death at once, and it
announces itself in the worker registry.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
from natflow_engine import (
    DEFAULT_ACK_WAIT,
    FENCED,
    RUNS_HELD,
    TASK_PREFIX,
    TASK_STREAM,
    TRANSIENT,
    Drained,
    HistoryStore,
    InvalidInput,
    Leases,
    MissingKey,
    NatflowError,
    NoResponders,
    StartPuller,
    Task,
    TaskPuller,
    WrongKey,
    connected_user,
    decode_task,
    ensure_consumer,
    ensure_start_consumer,
    ensure_streams,
    one_error,
    ping_subject,
    prepare_worker,
    queue_consumer,
    queue_paused,
    quietly,
    running_loop_name,
    serve_metrics,
    start_task,
    to_seconds,
    wake_subject,
    worker_identity,
)
from nats.aio.msg import Msg

from ._admission import Admitter
from ._client import Client
from ._flow import declare_flow
from ._guard import RunGuard
from ._held import Held, observe_lag, same_task
from ._pulse import HeldRun, Pulse
from ._registration import Registration
from ._run_leases import RunLeases
from ._served import index_workflows, pick_queues, served_pairs
from ._steps import StepRuntime
from ._task_endings import MISSING_KEY_DELAY, TaskEndings
from ._task_processor import TaskProcessor
from ._triggers import declare_triggers
from ._watchdog import LoopWatchdog
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

_ENDING: Final = 1.0  # seconds a wake-up waits for the handling of its run to end, if it is

_UNWIND: Final = 5.0  # seconds the held runs' executions get to unwind once cancelled
_IDENTITY_LOOKS: Final = 3  # pings of the own identity before serving (see _check_identity_free)
MIN_LEASE_TTL = 1.0


class Worker:
    """Runs workflows from one or more task queues.

    Example::

        async with await Client.connect() as client:
            worker = Worker(client, workflows=[greet, order])
            await worker.run()          # until cancelled or worker.shutdown()

    ``queue=None`` serves every queue the given workflows declare. ``max_concurrent_runs``
    bounds the runs held at once; ``max_concurrent_steps`` (default: unbounded) the step
    bodies running at once. ``lease_ttl`` (seconds, at least 1) is how long a run stays
    with a worker that stopped heartbeating (paused, partitioned) before another takes it;
    a worker whose process died loses its runs within about a second when the engine runs.
    ``metrics_port`` serves Prometheus metrics on that port (off by default; ``natflow
    worker`` serves them on ``--metrics-port``).
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
        lease_ttl: float = DEFAULT_ACK_WAIT,
        metrics_port: int | None = None,
    ) -> None:
        self._client = client
        self._workflows = index_workflows(workflows)
        if max_concurrent_runs < 1:
            raise InvalidInput("max_concurrent_runs must be at least 1")
        if max_concurrent_steps is not None and max_concurrent_steps < 1:
            raise InvalidInput("max_concurrent_steps must be at least 1 (or None)")
        if not lease_ttl >= MIN_LEASE_TTL:
            raise InvalidInput(f"lease_ttl must be at least {MIN_LEASE_TTL} s, not {lease_ttl}")
        self.queues = pick_queues(self._workflows, queue)
        self._served = served_pairs(self._workflows, queue)
        # As given, for messages: self.identity may carry a hash where this is not a token.
        self._named = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.identity = worker_identity(self._named)
        self._metrics_port = metrics_port
        self._conn = client.connection
        self._store = HistoryStore(self._conn)
        self._leases = Leases(self._conn)
        self._run_leases = RunLeases(self._leases, self._conn, self.identity, float(lease_ttl))
        self._held: dict[str, Held] = {}
        self._slots = anyio.Semaphore(max_concurrent_runs)
        # Re-ask once a quarter of the slots is free, not for each slot taken or freed: an
        # idle worker made a pull request for every run it took (a server message in ~32).
        self._ask_at_least = max(1, max_concurrent_runs // 4)
        self._stopping = anyio.Event()
        self._stopped = anyio.Event()
        self._ran = False  # run() was entered: until then nothing is held, nothing to wait for
        self._drained = anyio.Event()
        self._not_pulling = anyio.Event()
        self._pullers: list[TaskPuller | StartPuller] = []
        self._runs_scope = anyio.CancelScope()
        self._outer: anyio.abc.TaskGroup | None = None
        self._guard = RunGuard(self._conn, self._store, self.identity)
        self._admitter = Admitter(self._conn, self.identity)
        self._endings = TaskEndings(
            self._conn, self._guard, self._run_leases, self._stopping, self._not_pulling
        )
        limiter = anyio.CapacityLimiter(max_concurrent_steps) if max_concurrent_steps else None
        self._steps = StepRuntime(limiter=limiter)
        self._processor = TaskProcessor(
            workflows=self._workflows,
            conn=self._conn,
            store=self._store,
            identity=self.identity,
            runtime=self._steps,
            guard=self._guard,
            admitter=self._admitter,
            leases=self._run_leases,
            endings=self._endings,
            stopping=self._stopping,
            busy=lambda: len(self._held) > 1,
        )
        self._registration = Registration(
            self._conn,
            self.identity,
            self.queues,
            self._workflows,
            self._served,
            self._held,
            self._run_leases,
            self._stopping,
        )
        self._pulse: Pulse | None = None
        self._pulse_thread = False

    @property
    def workflows(self) -> dict[str, Workflow]:
        return dict(self._workflows)

    @property
    def lease_ttl(self) -> float:
        """Seconds a run stays with this worker once its heartbeats stop (lowered at start
        to a queue's shorter ack deadline)."""
        return self._run_leases.ttl

    @property
    def held_runs(self) -> list[str]:
        """Ids of the runs this worker holds now."""
        return list(self._held)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled or :meth:`shutdown` is called."""
        self._ran = True
        try:
            await self._serve()
        finally:
            self._stopped.set()  # on any exit, a failed start too: shutdown() waits for it

    async def _serve(self) -> None:
        await ensure_streams(self._conn)
        await self._check_identity_free()
        prepare_worker(self._workflows, self.queues)
        if self._metrics_port:
            serve_metrics(self._metrics_port)
        pullers = [p for q, w in self._served for p in await self._subscribe(q, w)]
        self._registration.user = await connected_user(self._conn)
        ping = await self._start_pulse()
        watchdog = LoopWatchdog(asyncio.get_running_loop())
        watchdog.start()
        nudges = await self._conn.nc.subscribe(wake_subject(self.identity), cb=self._on_wake)
        await self._registration.announce(first=True)
        await declare_triggers(self._conn, self._workflows.values(), self.identity)
        await declare_flow(self._conn, self._workflows.values())
        log.info(
            "worker %s serving queues %s with workflows %s (lease %g s, event loop %s)",
            self.identity,
            ", ".join(self.queues),
            ", ".join(sorted(self._workflows)),
            self.lease_ttl,
            running_loop_name(),
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._watch_paused_queues)
                with self._runs_scope:
                    async with anyio.create_task_group() as runs:
                        async with anyio.create_task_group() as pulling:
                            for puller in pullers:
                                pulling.start_soon(self._take, puller, runs)
                                pulling.start_soon(self._ask, puller)
                            await self._stopping.wait()
                            pulling.cancel_scope.cancel()
                        for puller in pullers:
                            await puller.stop()
                        self._not_pulling.set()
                tg.cancel_scope.cancel()
        finally:
            watchdog.stop()
            with anyio.CancelScope(shield=True):
                await self._close(pullers, ping)
                await quietly(nudges.unsubscribe())

    async def _start_pulse(self) -> Any:
        """Heartbeats on their own thread and connection. If that cannot connect, they run
        on this loop and connection.

        Pings are answered on this connection too (returns its subscription): the engine's
        reaper takes "no responders" for a worker that is gone, and after a server of a
        cluster dies, the heartbeat's connection may take seconds to come back where this
        one took milliseconds (seen: runs taken from a live worker and their steps run
        twice). A worker is gone only when both are. A loop blocked by a step cannot answer
        here, but its subscription stands, so the reaper sees a slow answer, not none.
        """
        loop = asyncio.get_running_loop()
        self._pulse = Pulse(
            self._conn,
            self.identity,
            interval=max(0.2, self.lease_ttl / 3),
            held=lambda: list(self._held.values()),
            holds=self._holds,
            lost=lambda held, why: loop.call_soon_threadsafe(self._step_back, held, why),
        )
        self._pulse_thread = await anyio.to_thread.run_sync(self._pulse.start)
        if not self._pulse_thread:
            log.warning(
                "worker %s: heartbeats run on the worker's own loop (no second connection: "
                "%s); a blocking step can cost it its runs",
                self.identity,
                self._pulse.error,
            )
        return await self._conn.nc.subscribe(ping_subject(self.identity), cb=self._pulse.on_ping)

    async def _check_identity_free(self) -> None:
        """Refuse to serve under an identity another live process answers to. Two processes
        of one identity each took the other's runs for their own (a claim, a lease, a ping
        name the identity), so step bodies ran twice, and a dead one's runs waited out their
        lease because its twin answered the engine's pings. A few looks: the connection of a
        process that just died (a restarted worker's) may linger a moment."""
        for attempt in range(_IDENTITY_LOOKS):
            try:
                await self._conn.request(ping_subject(self.identity), b"", timeout=1.0)
            except NoResponders:
                return
            except NatflowError as exc:  # slow, or not allowed to ask: no proof of a twin
                log.debug("worker %s: identity check inconclusive: %s", self.identity, exc)
                return
            if attempt + 1 < _IDENTITY_LOOKS:
                await anyio.sleep(1.0)
        named = self._named
        token = f" (as {self.identity})" if self.identity != named else ""
        raise InvalidInput(
            f"worker identity {named!r} is taken: another live process answers to it{token} "
            f"(a second worker started with --identity {named}?). Give each worker "
            f"process its own identity; `natflow worker --processes N` names its processes "
            f"{named}-0, {named}-1, ... itself"
        )

    def _step_back(self, held: HeldRun, why: str) -> None:
        """On the worker's loop: the heartbeat found the run's lease lost."""
        if not isinstance(held, Held) or self._held.get(held.run_id) is not held or held.lost:
            return
        if "taken" in why:  # said once the run's handling ends (see _handle)
            FENCED.labels(held.execution_fields.get("workflow", ""), "lease").inc()
        else:
            log.warning("run %s: %s; stepping back", held.run_id, why, extra=held.execution_fields)
        held.lost = True
        held.scope.cancel()

    async def _subscribe(self, queue: str, workflow: str) -> list[TaskPuller | StartPuller]:
        """The workflow's pullers on the queue: its tasks, and its new runs' starts."""
        await ensure_consumer(self._conn, queue, workflow, self.lease_ttl)
        info = await self._conn.admin(
            f"consumer for workflow {workflow!r} on queue {queue}",
            lambda: self._conn.jsm.consumer_info(TASK_STREAM, queue_consumer(queue, workflow)),
        )
        ack_wait = info.config.ack_wait or self.lease_ttl
        if ack_wait < self.lease_ttl:  # another worker of the queue asked for less: honour it
            log.info("queue %s uses a %g s ack deadline; heartbeating to match", queue, ack_wait)
            self._run_leases.ttl = float(ack_wait)
        # The same deadline for the workflow's new runs as for its tasks.
        await ensure_start_consumer(self._conn, queue, workflow, min(ack_wait, self.lease_ttl))
        made: list[TaskPuller | StartPuller] = [
            TaskPuller(self._conn, queue, workflow),
            StartPuller(self._conn, queue, workflow),
        ]
        for puller in made:
            await puller.start()
            self._pullers.append(puller)
        return made

    async def _close(self, pullers: list[TaskPuller | StartPuller], ping: Any) -> None:
        for puller in pullers:
            await quietly(puller.stop())
        if ping is not None:
            await quietly(ping.unsubscribe())
        if self._pulse is not None and self._pulse_thread:
            await anyio.to_thread.run_sync(self._pulse.stop)
        await self._registration.withdraw()

    @property
    def step_threads(self) -> int:
        """Sync steps whose threads run now: after :meth:`shutdown`, those it left running
        (nothing can stop a thread; a process that exits waits for them)."""
        return int(self._steps.thread_limiter.borrowed_tokens)

    async def shutdown(self, grace: float | timedelta = 30.0) -> None:
        """Stop taking work and hand back what this worker holds.

        Running steps get ``grace`` seconds to finish and be recorded; then every held run is
        handed back (its task NAKed, its lease dropped) so another worker resumes it at once.
        """
        grace = to_seconds("grace", grace)  # a timedelta too; negative or NaN refused
        self._stopping.set()
        if self._stopped.is_set() or not self._ran:  # over, failed, or never started: it
            return  # holds nothing (and a run() called later stops at once)
        # Drain first: a step that ends while the pulls are being withdrawn must not be
        # followed by the next one here.
        for held in list(self._held.values()):
            if held.execution is not None:
                held.execution.drain()
        with anyio.move_on_after(5):
            await self._not_pulling.wait()
        with anyio.move_on_after(grace):
            while self._held:
                self._drained = anyio.Event()
                await self._drained.wait()
        remaining = list(self._held.values())
        self._runs_scope.cancel()
        with anyio.move_on_after(_UNWIND):  # their executions unwind: nothing else appends
            for held in remaining:
                await held.finished.wait()
        for held in remaining:
            # A graceful stop that cuts a step short is not a death: recorded, so that a
            # rolling deploy repeated during a long step never holds its run as poisoned.
            # Not for a run whose execution still waits on a step's thread (it is in no
            # state to append; it goes back all the same).
            if held.execution is not None and held.finished.is_set():
                await held.execution.release(f"the worker stopped after a grace of {grace:g} s")
            await self._endings.hand_back(held)
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
        assert self._outer is not None
        try:
            await self.shutdown(grace=0 if exc is not None else 30.0)
        finally:
            # The body's own error leaves as itself (anyio's group made `except RunFailed`
            # around an `async with Worker(...)` miss it).
            with one_error():
                result = await self._outer.__aexit__(exc_type, exc, tb)
        return result

    # -- pulling ---------------------------------------------------------------------------

    async def _ask(self, puller: TaskPuller | StartPuller) -> None:
        """Keep as many tasks (or starts) asked for as there are free run slots."""
        ensure = ensure_consumer if isinstance(puller, TaskPuller) else ensure_start_consumer
        await puller.keep_asking(
            lambda: self._slots.value,
            on_refused=lambda: ensure(self._conn, puller.queue, puller.workflow, self.lease_ttl),
            at_least=self._ask_at_least,
        )

    async def _take(self, puller: TaskPuller | StartPuller, runs: anyio.abc.TaskGroup) -> None:
        async for msg in Drained(puller.messages):
            if self._stopping.is_set():
                await quietly(msg.nak())
                continue
            try:  # a free slot at once, without the loop turn acquire() takes first
                self._slots.acquire_nowait()
            except anyio.WouldBlock:
                await self._slots.acquire()
            runs.start_soon(self._handle, msg)

    async def _handle(self, msg: Msg) -> None:
        held: Held | None = None
        try:
            task = self._task_of(msg)
            if isinstance(task, str):
                await self._endings.set_aside(msg, task)
                return
            previous = self._held.get(task.run_id)
            if previous is not None and same_task(previous.msg, msg):
                # Redelivered to this worker while it still holds the run (it missed its
                # heartbeats): keep the running execution, which history fences if another
                # worker took the run meanwhile, and follow the newer delivery.
                log.debug("run %s: task redelivered while held", task.run_id)
                previous.msg = msg
                return
            if previous is not None:
                # A new task (a wake-up: a signal, a cancel, a timer, a slot) for a run held
                # here. While its handling is live the wake-up is a nudge, as on the wake
                # subject: it missed it before (a cancel of a new run, which is held without
                # a task, was ignored till the run's end), and a second execution beside it
                # (there was one, once the wait below ran out) runs its steps again. Should
                # that handling be ending (it let the run go, or gave it up), the task is
                # taken once it is done, as the next holder would.
                live = not (previous.released or previous.lost)
                if live:
                    self._nudge(previous)
                with anyio.move_on_after(_ENDING if live else self.lease_ttl):
                    await previous.finished.wait()
                if live and not previous.finished.is_set():
                    await quietly(msg.ack())  # the live handling took the wake-up
                    return
            held = Held(msg=msg, run_id=task.run_id, queue=_queue_of(msg.subject))
            self._held[task.run_id] = held
            RUNS_HELD.inc()
            observe_lag(held)
            with held.scope:
                await self._processor.process(held, task)
            if held.scope.cancelled_caught and held.lost:
                log.info(
                    "run %s: lease taken by another worker; stepping back",
                    held.run_id,
                    extra=held.execution_fields,
                )
        except TRANSIENT as exc:
            run_id = held.run_id if held else "?"
            log.warning("run %s: handing it back: %s", run_id, exc)
            if held is not None:
                await self._endings.back_off(held, exc, park=False)
        except (MissingKey, WrongKey) as exc:  # a worker with the right key takes it, later
            log.error("run %s: handing it back: %s", held.run_id if held else "?", exc)
            if held is not None:
                wait = held.execution.key_wait if held.execution is not None else None
                if wait is not None:  # a signal's key: back at once while nothing changes
                    self._processor.key_waits.note(held.run_id, *wait)
                await self._endings.hand_back(held, delay=MISSING_KEY_DELAY)
        except Exception as exc:
            if held is not None:
                await self._endings.back_off(held, exc, park=True)
        finally:
            if held is not None and held.admission is not None:  # an error, a cancellation
                with anyio.CancelScope(shield=True):
                    await self._admitter.settle(held.admission, waiting=False, lost=held.lost)
            if held is not None and held.execution is None and held.lease is not None:
                with anyio.CancelScope(shield=True):  # leased beside its claim, then let go
                    await self._run_leases.release(held)
            if held is not None and self._held.get(held.run_id) is held:
                del self._held[held.run_id]
                RUNS_HELD.dec()
            if held is not None:
                held.finished.set()
            if not self._held:
                self._drained.set()
            self._slots.release()
            for puller in self._pullers:
                puller.wake()

    @staticmethod
    def _task_of(msg: Msg) -> Task | str:
        """The task a delivery stands for (a task, or a new run's start read from history),
        or why it cannot be one."""
        if msg.subject.startswith(TASK_PREFIX + "."):
            try:
                task = decode_task(msg.data)
            except Exception as exc:
                return f"the task does not decode: {exc}"
            if msg.subject.rsplit(".", 1)[-1] != task.run_id:
                return f"the task names run {task.run_id[:200]!r}, its subject another"
            return task
        return start_task(msg)

    def _holds(self, run_id: str) -> bool:
        """Whether this worker holds the run (and has not handed its task back)."""
        held = self._held.get(run_id)
        return held is not None and not held.released

    # -- heartbeats, pings, pauses ---------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            await anyio.sleep(max(0.2, self.lease_ttl / 3))
            if self._pulse is not None and not self._pulse_thread:  # no thread: beat here
                await self._pulse.beat_all(self._conn.nc, self._leases)
            await self._registration.announce()

    async def _watch_paused_queues(self) -> None:
        """``natflow queues pause``: runs held here of a paused queue start no further step;
        once their running steps are recorded they go back to the (paused) queue."""
        while True:
            await anyio.sleep(max(0.2, self.lease_ttl / 3))
            for queue in self.queues:
                served = [w for q, w in self._served if q == queue]
                try:
                    paused = await queue_paused(self._conn, queue, served, budget=1.0)
                except (NatflowError, nats.errors.Error, nats.js.errors.Error) as exc:
                    log.debug("queue %s: pause state unknown (%s)", queue, exc)
                    continue
                for held in list(self._held.values()) if paused else []:
                    if held.queue == queue and held.execution is not None:
                        held.execution.drain()

    async def _on_wake(self, msg: Msg) -> None:
        held = self._held.get(msg.data.decode(errors="replace"))
        if held is not None:
            self._nudge(held)

    @staticmethod
    def _nudge(held: Held) -> None:
        """Tell the run's handling here that signals or a due timer wait for it."""
        if held.execution is not None:
            held.execution.signals_arrived()
        else:  # leased before its execution is built (see _preclaim)
            held.nudged = True


def _queue_of(subject: str) -> str:
    """The queue a delivery came from: ``natflow.task.<queue>.<workflow>.<run_id>`` or
    ``natflow.history.<run_id>.start.<queue>.<workflow>``."""
    tokens = subject.split(".")
    return tokens[4] if tokens[1] == "history" else tokens[2]
