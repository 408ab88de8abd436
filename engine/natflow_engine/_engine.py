"""The engine services: stateless processes that keep what is derived from history current.

The dispatcher reads every run-level event (``natflow.history.*.run`` and
``natflow.history.*.start.>``: starts, claims, timers, status changes; never a step's)
through two durable pull consumers shared by all engine replicas, one per filter (see
:func:`dispatcher_configs`), processes the events of different runs at once and each run's
in the order read (``_lanes``), and

* folds it into the run index (``natflow.runs.<run_id>``) behind ``client.list``;
* for a ``run_started`` whose run has done nothing since, makes sure a task exists or a
  start consumer holds it, so a client that died between creating a run and enqueueing its
  task loses no start (looked at only once a grace has passed without the run moving on:
  ``_start_watch``);
* mirrors timers into the ``natflow_timers`` bucket (see ``_timers``).

Beside the dispatcher, the index guard (``_index_guard``) checkpoints how far the run index
is on disk and, after the server restarted, rewrites from history what it lost.

Beside it run the reaper (``_reaper``), the limit service (``_limit_service``), the timer
service (``_timers``), the signal intake (``_signals``), the schedule service
(``_scheduler``), the event intake (``_triggers``), the metrics poller (``_metrics``) and,
given nats-server's monitoring URL, the JetStream usage poller (``_jsz``); the dispatcher
also counts each run-level event it folds (runs started and closed, run duration, blocked runs).

The engine keeps nothing but a cache; kill it, restart it or run several: the consumer's
position and the index live in JetStream.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Final

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js import api

from . import _timers as timers
from ._completion import RunHooks
from ._connection import Connection, quietly
from ._engine_metrics import EngineMetrics
from ._errors import NatflowError
from ._event_loop import running_loop_name
from ._handoff import Drained
from ._history import CorruptHistory, HistoryStore
from ._index import RunIndex, makes_timer
from ._index_guard import IndexGuard
from ._jsz import JetStreamUsage
from ._lanes import Lanes
from ._limit_service import LimitService
from ._limits import waiting_for
from ._log_repeats import level_for
from ._logs import fields
from ._metrics import observe_run
from ._names import check_token
from ._puller import Puller, durable_info, engine_consumer, ensure_durable
from ._quarantine import quarantined
from ._reaper import Reaper
from ._retention import RetentionService, purge
from ._scheduler import Scheduler
from ._signals import ChildOutcome, SignalIntake, send_child_outcome
from ._site_links import site_links
from ._sites import SiteInbox, check_site, ensure_hub
from ._start_consumers import held_starts
from ._start_order import StartOrder
from ._start_service import StartService
from ._start_watch import StartWatch, WatchedStart
from ._state import RunInfo
from ._streams import (
    DISPATCHER,
    HISTORY_STREAM,
    RUN_LEVEL_EVENTS,
    RUN_LEVEL_FILTER,
    START_DISPATCHER,
    START_FILTER,
    ensure_streams,
    is_start_subject,
    record_sync_mode,
    run_id_of,
    start_subjects,
    step_level_subject,
    stream_created,
)
from ._tasks import Task, enqueue, queued
from ._triggers import EventIntake
from ._wake import run_start
from .events import (
    TERMINAL_EVENTS,
    Event,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    RunTerminated,
    TimerFired,
    decode_event,
    event_kind,
)

log = logging.getLogger("natflow.engine")

_DISPATCH_WINDOW: Final = 256  # events asked for at a time, by each consumer
_CHECKS_AT_ONCE: Final = 32  # starts past their grace checked concurrently


def dispatcher_configs(start_from: int | None = None) -> list[api.ConsumerConfig]:
    """The dispatcher's consumers: run-level events, and starts on their start subjects.

    Two consumers of one filter each, not one of both filters: nats-server finds a
    multi-filter consumer's next message by intersecting its filters with every subject
    of the message block (``firstMatchingMulti``), each subject of each run, holding the
    store's lock, where a one-filter consumer walks the few messages to its next match.
    On 16 cores the dispatcher fell behind under load, each message then cost the whole
    block's subjects, and appends waited on that lock: 8 and 16 workers ran slower than 4.

    ``start_from``: the stream sequence the starts' consumer begins at, if it is new (an
    engine upgraded from one consumer of both filters: where that one had acknowledged).
    """
    starts = engine_consumer(
        START_DISPATCHER, "natflow engine: immediate starts (index, start dispatch)", START_FILTER
    )
    if start_from is not None:
        starts.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        starts.opt_start_seq = start_from
    return [
        engine_consumer(
            DISPATCHER, "natflow engine: run-level events (index, timers)", RUN_LEVEL_FILTER
        ),
        starts,
    ]


def _buffered(puller: Puller) -> int:
    """Messages delivered to the dispatcher and not yet processed."""
    return puller.messages.statistics().current_buffer_used


def _room_for(puller: Puller, lanes: Lanes) -> int:
    """How many events one of the dispatcher's consumers may have asked for: its window,
    less what it was handed and is not yet processed (the lanes hold both consumers')."""
    return _DISPATCH_WINDOW - _buffered(puller) - len(lanes)


class Engine:
    """Runs the engine services on one connection until cancelled."""

    def __init__(
        self,
        conn: Connection,
        *,
        metrics_interval: float = 5.0,
        nats_monitor: str | None = None,
        retention: float | None = None,
        sites: Sequence[str] = (),
        site: str | None = None,
        hub_domain: str = "hub",
    ) -> None:
        self._conn = conn
        # At the hub: the sites whose runs it shows. At a site: its name (ops/sites).
        self.sites = [check_site(name) for name in sites]  # refused here, not at run()
        check_token("hub_domain", hub_domain)
        self.site_inbox = SiteInbox(conn, site, hub_domain) if site else None
        self.links = site_links(conn, self.sites, site, hub_domain)
        self.hooks = RunHooks(conn)  # lifecycle events and on_complete runs
        self.retention = RetentionService(conn, retention)
        self._history = HistoryStore(conn)
        self._index = RunIndex(conn)
        self.index_guard = IndexGuard(conn, self._index, self._ack_floor)
        self.reaper = Reaper(conn)
        self.limits = LimitService(conn)  # grants concurrency slots to waiting runs
        self.reaper.on_reaped.append(self.limits.reap)
        self.timers = timers.TimerService(conn, self._index)
        self.signals = SignalIntake(conn)
        self.scheduler = Scheduler(conn)
        self.events = EventIntake(conn)
        self.starts = StartService(conn)  # starts from clients that may not write history
        self._watched = StartWatch()  # starts whose task is checked once their grace passed
        self._lanes = Lanes(self._dispatch)  # the dispatcher's, once it runs
        self._reached = 0.0  # server time of the newest run-level event the dispatcher read
        self._caught_up = True  # that event was the last the dispatcher's consumer had
        self._last_read = time.monotonic()  # when the dispatcher last took a message
        self.metrics = EngineMetrics(
            conn, interval=metrics_interval, timers_pending=lambda: len(self.timers.timers)
        )
        # JetStream usage from nats-server's /jsz, when its monitoring URL is known.
        # It also records the server's sync mode where workers read it (record_sync_mode).
        self.jetstream = (
            JetStreamUsage(
                nats_monitor,
                interval=metrics_interval,
                on_read=lambda jsz: record_sync_mode(conn, jsz.config.sync_always),
                own_stream=(HISTORY_STREAM, lambda: stream_created(conn, HISTORY_STREAM)),
            )
            if nats_monitor
            else None
        )
        self.ready = anyio.Event()

    async def run(self) -> None:
        await ensure_streams(self._conn)
        if self.sites:
            await ensure_hub(self._conn, self.sites)
        async with anyio.create_task_group() as tg:
            if self.site_inbox is not None:
                tg.start_soon(self.site_inbox.run)
            if self.links is not None:
                tg.start_soon(self.links.run)
            tg.start_soon(self.reaper.run)
            tg.start_soon(self.limits.run)
            tg.start_soon(self.timers.run)
            tg.start_soon(self.signals.run)
            tg.start_soon(self.scheduler.run)
            tg.start_soon(self.events.run)
            tg.start_soon(self.metrics.run)
            tg.start_soon(self.starts.run)
            if self.jetstream is not None:
                tg.start_soon(self.jetstream.run)
            tg.start_soon(self.retention.run)
            tg.start_soon(self._guard_index)
            await self._dispatch_forever()

    async def _guard_index(self) -> None:
        await self.ready.wait()  # the dispatcher's consumer exists: its floor can be read
        await self.index_guard.run()

    async def _ack_floor(self) -> int:
        """The dispatcher's acknowledgement floor: every event at or below it is processed.

        The run-level consumer's floor, or the starts' consumer's if lower and it has a
        start pending or unacknowledged (read second: one with nothing left has processed
        every start stored before the first floor, however long ago its own last start)."""
        runs = await self._consumer(DISPATCHER)
        floor = runs.ack_floor.stream_seq if runs.ack_floor is not None else 0
        starts = await self._consumer(START_DISPATCHER)
        if starts.num_pending or starts.num_ack_pending:
            floor = min(floor, starts.ack_floor.stream_seq if starts.ack_floor else 0)
        return floor

    async def _consumer(self, name: str) -> api.ConsumerInfo:
        info = await durable_info(self._conn, HISTORY_STREAM, name, "the engine's consumer")
        if info is None:
            raise NatflowError(f"the engine's consumer {name} was deleted; restart the engine")
        return info

    async def _ensure_dispatchers(self) -> None:
        """Create the dispatcher's consumers, or update them to their filters. An engine
        upgraded from one consumer of both filters starts its new starts' consumer where
        that one had acknowledged, not at the stream's first start; that consumer keeps its
        start ever after (nats-server refuses to change where a consumer starts)."""
        what = "the engine's consumer"
        start_from = None
        starts = await durable_info(self._conn, HISTORY_STREAM, START_DISPATCHER, what)
        if starts is not None:
            if starts.config.deliver_policy == api.DeliverPolicy.BY_START_SEQUENCE:
                start_from = starts.config.opt_start_seq
        else:
            old = await durable_info(self._conn, HISTORY_STREAM, DISPATCHER, what)
            if old is not None and START_FILTER in (old.config.filter_subjects or ()):
                start_from = (old.ack_floor.stream_seq if old.ack_floor else 0) + 1
        for config in dispatcher_configs(start_from):
            await ensure_durable(self._conn, HISTORY_STREAM, config, what)

    async def _dispatch_forever(self) -> None:
        await self._ensure_dispatchers()
        runs = Puller(self._conn, HISTORY_STREAM, DISPATCHER)
        starts = Puller(self._conn, HISTORY_STREAM, START_DISPATCHER)
        pullers = (runs, starts)
        for puller in pullers:
            await puller.start()

        def room() -> None:
            # Ask again once half a window can be asked for: one pull request per ~128
            # events, not one per event as soon as the window has room.
            if len(lanes) > _DISPATCH_WINDOW // 2:
                return  # no puller has that much room
            for puller in pullers:
                if _room_for(puller, lanes) - puller.pending >= _DISPATCH_WINDOW // 2:
                    puller.wake()

        lanes = self._lanes = Lanes(self._dispatch, depth=2 * _DISPATCH_WINDOW, on_done=room)
        log.info("engine dispatcher running (event loop %s)", running_loop_name())
        self.ready.set()

        order = StartOrder(functools.partial(_buffered, starts))

        # Each consumer's events in the order read (the stream's), a run's start before its
        # later events (``_start_order``): the events of one run are then processed in that
        # order (``_lanes``), those of others at once.
        async def read_starts() -> None:
            async for msg in Drained(starts.messages):
                order.taking()
                run_id = run_id_of(msg.subject)
                await lanes.put(run_id, msg, self._note_position(msg, False))
                order.read(run_id, msg.metadata.sequence.stream)

        async def read_run_level() -> None:
            async for msg in Drained(runs.messages):
                run_id = run_id_of(msg.subject)
                if event_kind(msg.data) == "run_started":
                    order.seen(run_id)
                elif order.ahead(run_id, msg.metadata.sequence.stream):
                    await order.before(run_id, msg.metadata.sequence.stream)
                await lanes.put(run_id, msg, self._note_position(msg, True))

        try:
            async with anyio.create_task_group() as tg:
                # Ask for what the dispatcher can take, not for what it has been handed: a
                # backlog held unprocessed (in the puller or in the lanes) would outlive its
                # ack deadline and come back twice.
                for puller in pullers:
                    tg.start_soon(
                        functools.partial(
                            puller.keep_asking,
                            functools.partial(_room_for, puller, lanes),
                            at_least=_DISPATCH_WINDOW // 2,
                        )
                    )
                tg.start_soon(self._check_starts)
                await tg.start(lanes.run)
                tg.start_soon(read_starts)
                await read_run_level()
        finally:
            # Shielded: a cancelled engine that kept these subscriptions would keep receiving
            # (and never acknowledging) the events its outstanding pulls asked for.
            with anyio.CancelScope(shield=True):
                # To a replica (or restart) at once: held starts, and events taken but not
                # processed (cut off mid-way: processing is idempotent).
                for held in self._watched.drop() + lanes.unfinished():
                    await quietly(held.nak())
                for puller in pullers:
                    try:
                        await puller.stop()
                    except Exception:  # the connection is going away; the server drops it
                        log.debug("unsubscribe failed", exc_info=True)

    async def _dispatch(self, run_id: str, msg: Msg) -> None:
        """Process one event (in its run's lane: after the run's earlier events)."""
        kind = event_kind(msg.data)
        if kind != "run_started" and len(self._watched):
            started = self._watched.moved_on(run_id)
            if started is not None:  # a worker has the run: its start needs no check
                await quietly(started.ack())
        if kind not in RUN_LEVEL_EVENTS:
            # Not a kind natflow stores on a run-level subject: nothing to fold.
            await quietly(msg.ack())
            return
        try:
            event = decode_event(msg.data)
        except Exception as exc:
            # Nothing natflow writes fails to decode; a foreign message is reported, not fatal
            # (the worker holds its run as blocked when it next reads the history).
            seq = msg.metadata.sequence.stream
            quarantined("dispatcher_event", f"{msg.subject} #{seq}", str(exc), logger=log)
            await quietly(msg.ack())
            return
        try:
            hseq = msg.metadata.sequence.stream
            info = await self._index.apply(run_id, event, hseq, self.hooks.status_changed)
            if info is not None:
                observe_run(event, info)
            await self._keep_timers(run_id, event, hseq)
            if isinstance(event, RunContinued):  # its rollup dropped the older run-level ones
                for older in (step_level_subject(run_id), start_subjects(run_id)):
                    await purge(self._conn, HISTORY_STREAM, older, below=hseq)
            if isinstance(event, TERMINAL_EVENTS):
                await self._tell_parent(run_id, event, info)
                await self.limits.run_closed(run_id)
            hooked = self._index.may_have_on_complete(run_id)
            await self.hooks.event_folded(run_id, event, hooked=hooked)
            if isinstance(event, RunStarted):
                self.retention.learn(event.retention)
        except Exception as exc:
            log.log(
                level_for("dispatch"),
                "run %s: engine could not process %s (%s); will retry (more such failures "
                "within 30 s are logged at debug)",
                run_id,
                msg.subject,
                exc,
                extra=fields(run_id),
            )
            # 1 s, doubling with each redelivery up to 30 s: what fails for every event (the
            # store full) is not retried thousands of times a minute meanwhile.
            tries = max(1, msg.metadata.num_delivered or 1)
            await quietly(msg.nak(delay=min(30.0, 2.0 ** min(tries - 1, 5))))
            return
        # An immediate start (a restart enqueues once its seed is written): acknowledged when
        # the run moves on (its next event, in this lane), or checked once its grace has
        # passed (see _start_watch).
        if isinstance(event, RunStarted) and self._to_watch(run_id, event, hseq):
            stored = msg.metadata.timestamp.timestamp()
            earlier = self._watched.add(run_id, event, msg, stored)
            if earlier is not None:
                await quietly(earlier.ack())
            return
        await quietly(msg.ack())

    def _to_watch(self, run_id: str, start: RunStarted, hseq: int) -> bool:
        """Whether a start (stream sequence ``hseq``) waits for its run to move on: an
        immediate one, unless it came back (NAKed by an engine that stopped, or past its
        ack deadline) after its run moved on, as the index shows."""
        if start.not_before is not None or start.restarted_from:
            return False
        return not self._index.moved_on_since(run_id, hseq)

    def _note_position(self, msg: Msg, run_level: bool) -> float:
        """Where the dispatcher's reader of run-level events is in the stream: the server's
        time of the message (returned), and whether more wait (with
        :attr:`_processed_until`, the clocks :class:`StartWatch` counts a start's grace on:
        a start is alone once the run-level events stored in its grace are processed)."""
        meta = msg.metadata
        stored = meta.timestamp.timestamp()
        if run_level:
            self._reached = max(self._reached, stored)
            self._caught_up = meta.num_pending == 0
        self._last_read = time.monotonic()
        return stored

    @property
    def _processed_until(self) -> float:
        """The server time before which every event the dispatcher read is processed: a
        start's claim read but still queued in a lane has not moved its start on yet."""
        return min(self._reached, self._lanes.oldest_stored())

    @property
    def _idle(self) -> bool:
        """Caught up with the stream, or handed nothing for a whole grace (with several
        replicas the stream's last message may have gone to another one)."""
        idle = self._caught_up and not len(self._lanes)
        return idle or time.monotonic() - self._last_read > self._watched.grace

    async def _check_starts(self) -> None:
        """Make sure each start still alone after its grace has a task (its client may
        have died before enqueueing it), then acknowledge it. Checked several at once: a
        burst of starts must not wait out their ack deadline in this queue."""
        limit = anyio.CapacityLimiter(_CHECKS_AT_ONCE)

        async def check(watched: WatchedStart) -> None:
            async with limit:
                try:
                    await self._ensure_task(watched.run_id, watched.start)
                except Exception as exc:
                    log.warning(
                        "run %s: engine could not check its start (%s); will retry",
                        watched.run_id,
                        exc,
                    )
                    await quietly(watched.msg.nak(delay=1.0))
                    return
                await quietly(watched.msg.ack())

        async with anyio.create_task_group() as tg:
            while True:
                await anyio.sleep(0.25)
                due = self._watched.due(self._processed_until, self._idle)
                for watched in await self._without_task(due):  # none due: no request
                    tg.start_soon(check, watched)

    async def _without_task(self, due: list[WatchedStart]) -> list[WatchedStart]:
        """The starts among ``due`` whose run has no task; those whose run has one are
        acknowledged. Under a backlog most starts outlive their grace in the queue, and
        checking each would cost a read and a refused enqueue; one lookup answers for 256.

        A task seen is one a worker will take, even where a replica a moment behind answers
        for one just taken: its worker claims the run, or leaves it to the limit service.
        That is what a refused enqueue showed before (``_ensure_task``)."""
        try:
            # A start its workers read from history is theirs while their start consumer
            # holds it (pending, or in a worker's hands), as a task would be.
            held = await held_starts(
                self._conn,
                [
                    (
                        w.start.queue,
                        w.start.workflow,
                        w.msg.metadata.sequence.stream,
                        w.msg.metadata.timestamp.timestamp(),
                    )
                    for w in due
                    if is_start_subject(w.msg.subject)
                ],
            )
            have = await queued(
                self._conn, [(w.start.queue, w.start.workflow, w.run_id) for w in due]
            )
        except (NatflowError, nats.errors.Error) as exc:  # an older server: each alone
            log.debug("could not look up the tasks of %d starts (%s)", len(due), exc)
            return due
        left = []
        for watched in due:
            if watched.run_id in have or watched.msg.metadata.sequence.stream in held:
                await quietly(watched.msg.ack())
            else:
                left.append(watched)
        return left

    async def _tell_parent(self, run_id: str, event: Event, info: RunInfo | None) -> None:
        """A closed child run's outcome goes to its parent as a ``$child`` signal, which
        wakes the parent like any signal (no polling); deduplicated on the child's id."""
        if info is not None:
            parent = info.parent
        else:  # a redelivery: the index has it already, but the parent may not
            start = await run_start(self._conn, run_id)
            parent = start.parent if start is not None else None
        if parent is None:
            return
        # As one event at a time would: the parent's own end, when read before this one (a
        # cancelled parent whose children end with it), is folded first, so no outcome goes
        # to a parent already closed (a dead letter).
        await self._lanes.earlier_done()
        known = await self._index.get(parent)
        if known is not None and known.is_closed:
            return  # nobody waits for it (cancelled before its child): no dead letter
        outcome = ChildOutcome(child_run_id=run_id, status="completed")
        if isinstance(event, RunCompleted):
            outcome.result = event.result
        elif isinstance(event, RunFailed):
            outcome.status, outcome.error = "failed", event.error
        elif isinstance(event, RunCancelled | RunTerminated):
            outcome.reason = event.reason
            outcome.status = "cancelled" if isinstance(event, RunCancelled) else "terminated"
        await send_child_outcome(self._conn, parent, outcome)

    async def _keep_timers(self, run_id: str, event: Event, hseq: int) -> None:
        """Mirror history's timers into KV (the event's stream sequence is ``hseq``)."""
        if makes_timer(event) and self._index.closed_since(run_id, hseq):
            # The run's end was folded first (this event came back, or another replica took
            # it later): a timer written now would outlive the run, and the end may have
            # been folded before this event marked the run as one with timers.
            await timers.cancel_run(self._conn, run_id)
        elif isinstance(event, RunContinued):
            # Timers of older stretches (their events are gone with them, some perhaps
            # before this dispatcher saw them) must not keep waking the run. Its next
            # stretch's task (its worker may have died before enqueueing it) is checked like
            # an immediate start's: see _check_starts.
            await timers.cancel_timers_through(self._conn, run_id, event.base_seq)
        elif (timer := timers.timer_of(run_id, event)) is not None:
            await timers.schedule(self._conn, timer)
        elif isinstance(event, TimerFired):
            await timers.cancel(self._conn, run_id, event.seq)
        elif isinstance(event, RunClaimed):
            # A delayed start has started. Only a delayed start has a start timer: a run whose
            # immediate start this engine read needs no delete (a write per run, fsynced).
            if not self._watched.started_now(run_id) and not self._index.has_no_timers(run_id):
                await timers.cancel(self._conn, run_id, 0)
        elif isinstance(event, TERMINAL_EVENTS) and not self._index.has_no_timers(run_id):
            # Read the run's timers only if it may have some: the index says whether any
            # event folded before this one made one (they all come before the run's end).
            await timers.cancel_run(self._conn, run_id)

    async def _ensure_task(self, run_id: str, start: RunStarted) -> None:
        try:
            last = await self._history.last(run_id)
        except CorruptHistory:  # a worker must see it (and hold the run as blocked)
            last = (start, 0)
        if last is None or not isinstance(last[0], RunStarted):
            return  # a worker has the run already
        if self.limits.waiting(run_id):
            return  # it waits for a concurrency slot: the limit service enqueues it in turn
        if await enqueue(
            self._conn, start.queue, Task(run_id=run_id, workflow=start.workflow, reason="dispatch")
        ) and not await waiting_for(self._conn, run_id):  # a waiting run: a harmless nudge
            log.info("run %s: enqueued a start its client had not", run_id)
