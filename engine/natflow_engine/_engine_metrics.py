"""The engine's poller: the gauges history cannot give, read from JetStream every few
seconds (queues from the task consumers, live workers from the registry, runs by status
from the run index). Every engine replica exports the same numbers: aggregate with ``max``.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final

import anyio
import msgspec

from ._connection import ApiError, Connection
from ._errors import NatflowError
from ._index import RunIndex
from ._metrics import (
    QUEUE_ACK_PENDING,
    QUEUE_CONSUMER_PREFIX,
    QUEUE_PENDING,
    QUEUE_PENDING_AGE,
    QUEUE_REDELIVERED,
    QUEUE_RUNS_PENDING,
    QUEUE_WAITING,
    RUN_STATUSES,
    RUNS_BY_STATUS,
    SIGNALS_REJECTED,
    START_CONSUMER_PREFIX,
    TAKEOVERS,
    TIMERS_PENDING,
    WORKERS_LIVE,
    known_workflows,
)
from ._registry import list_workers
from ._state import RunInfo
from ._streams import HISTORY_STREAM, TASK_STREAM
from ._undecodable import UNDECODABLE
from .events import utcnow

log = logging.getLogger("natflow.metrics")


class _ConsumerState(msgspec.Struct):
    name: str = ""
    num_pending: int = 0
    num_ack_pending: int = 0
    num_redelivered: int = 0
    num_waiting: int = 0


class _ConsumerList(msgspec.Struct):
    total: int = 0
    consumers: list[_ConsumerState] = []
    error: ApiError | None = None


_list_decoder = msgspec.json.Decoder(_ConsumerList)


class EngineMetrics:
    """Polls JetStream for the gauges history cannot give: queues, workers, runs by status.

    Every ``interval`` seconds it reads the task consumers and the worker registry; every
    ``runs_every``-th time it also counts the run index (one read of every run's summary).
    The first count comes a whole ``runs_every`` rounds after the start, not at it: engine
    replicas restarted together (a deploy; ``natflow bench`` starts them for each of its
    phases) would otherwise each read the whole index at once, beside the runs they serve.
    """

    def __init__(
        self,
        conn: Connection,
        *,
        interval: float = 5.0,
        runs_every: int = 6,
        timers_pending: Callable[[], int] | None = None,
    ) -> None:
        self._conn = conn
        self.interval = interval
        self._runs_every = max(1, runs_every)
        self._timers_pending = timers_pending
        self._queues_seen: set[str] = set()
        self.polls = 0
        SIGNALS_REJECTED.labels("engine")

    async def run(self) -> None:
        while True:
            try:
                await self.poll()
            except (NatflowError, OSError, TimeoutError, *UNDECODABLE) as exc:
                log.warning("metrics poll failed (%s); next try in %g s", exc, self.interval)
            except Exception as exc:  # nats-py's own errors: never let metrics stop the engine
                log.warning("metrics poll failed (%r); next try in %g s", exc, self.interval)
            await anyio.sleep(self.interval)

    async def poll(self) -> None:
        queues = await self._queues()
        await self._workers(queues)
        if self._timers_pending is not None:
            TIMERS_PENDING.set_all({(): float(self._timers_pending())})
        self.polls += 1
        if self.polls % self._runs_every == 0:
            await self._runs()

    async def _consumers(self, stream: str) -> list[_ConsumerState]:
        found: list[_ConsumerState] = []
        while True:
            body = msgspec.json.encode({"offset": len(found)})
            subject = f"{self._conn.api}.CONSUMER.LIST.{stream}"
            msg = await self._conn.request(subject, body)
            page = _list_decoder.decode(msg.data)
            if page.error is not None:
                raise NatflowError(f"cannot list {stream}'s consumers: {page.error.description}")
            found.extend(page.consumers)
            if not page.consumers or len(found) >= page.total:
                return found

    async def _queues(self) -> set[str]:
        pending: dict[tuple[str, ...], float] = {}
        acks: dict[tuple[str, ...], float] = {}
        redelivered: dict[tuple[str, ...], float] = {}
        waiting: dict[tuple[str, ...], float] = {}
        # A queue's backlog is its tasks and its new runs' starts not yet taken.
        found = [(c, QUEUE_CONSUMER_PREFIX) for c in await self._consumers(TASK_STREAM)] + [
            (c, START_CONSUMER_PREFIX) for c in await self._consumers(HISTORY_STREAM)
        ]
        for c, prefix in found:
            if not c.name.startswith(prefix):
                continue
            # natflow-queue-<queue>~<workflow> (and natflow-start-): one consumer per
            # workflow, summed per queue
            key = (c.name[len(prefix) :].partition("~")[0],)
            TAKEOVERS.labels(key[0], "reaped")
            pending[key] = pending.get(key, 0.0) + c.num_pending
            acks[key] = acks.get(key, 0.0) + c.num_ack_pending
            redelivered[key] = redelivered.get(key, 0.0) + c.num_redelivered
            waiting[key] = waiting.get(key, 0.0) + c.num_waiting
        QUEUE_PENDING.set_all(pending)
        QUEUE_ACK_PENDING.set_all(acks)
        QUEUE_REDELIVERED.set_all(redelivered)
        QUEUE_WAITING.set_all(waiting)
        self._queues_seen |= {queue for (queue,) in pending}
        return {queue for (queue,) in pending}

    async def _workers(self, queues: set[str]) -> None:
        live: Tally[str] = Tally({queue: 0 for queue in queues})
        for worker in await list_workers(self._conn):
            for queue in worker.queues:
                live[queue] += 0 if worker.draining else 1
        WORKERS_LIVE.set_all({(queue,): float(n) for queue, n in live.items()})

    async def _runs(self) -> None:
        counts: Tally[tuple[str, str]] = Tally()
        now = utcnow()
        waiting: Tally[str] = Tally()
        oldest: dict[str, float] = {}
        for run in await RunIndex(self._conn).scan(limit=1 << 30, explain=False):
            if run.site:  # a site's run, copied to this hub: the site's engine counts it
                continue
            counts[run.workflow, run.status] += 1
            self._queues_seen.add(run.queue)
            since = pending_since(run)
            if since is not None and since <= now:
                waiting[run.queue] += 1
                age = (now - since).total_seconds()
                oldest[run.queue] = max(oldest.get(run.queue, 0.0), age)
        QUEUE_RUNS_PENDING.set_all({(q,): float(waiting[q]) for q in self._queues_seen})
        QUEUE_PENDING_AGE.set_all({(q,): oldest.get(q, 0.0) for q in self._queues_seen})
        workflows = {workflow for workflow, _ in counts} | known_workflows()
        RUNS_BY_STATUS.set_all(
            {(wf, status): float(counts[wf, status]) for wf in workflows for status in RUN_STATUSES}
        )


def pending_since(run: RunInfo) -> datetime | None:
    """Since when a pending run waits for a worker: the end of its start delay (which the
    index keeps as ``current``, "starts at <time>"), the due time of the timer it waits to
    be woken for, or since it became pending (its summary's last change: its creation for a
    new run); None if not pending. Not its creation for them all: a run that slept a day and
    was due a moment ago waits a moment, not a day (the pending-too-long alert fired)."""
    if run.status != "pending":
        return None
    if run.current and run.current.startswith(_STARTS_AT):
        try:  # as _human.when writes it: "2026-11-26 03:29:15 UTC"
            moment = datetime.fromisoformat(run.current[len(_STARTS_AT) :].removesuffix(" UTC"))
        except ValueError:
            return run.created_at
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if run.due_at is not None and run.current and run.current.startswith("timer "):
        return run.due_at
    return run.updated_at


_STARTS_AT: Final = "starts at "
