"""Deleting closed runs, on request (``client.delete``) and by retention.

A run lives in several places, each keyed by its id; deleting it purges every one of them:
the large values only it refers to (``_value_refs``), its lifecycle events, signals, dead
letters, timer and lease entries (KV delete markers included), task, index entry, and last
its history. History goes last so that a delete cut
short (a crash, a lost connection) can simply be run again: until history is gone the run
still exists and is still closed.

Retention: ``natflow engine --retention DURATION`` keeps a closed run that long after it
closed; ``@workflow(retention=...)`` sets a run's own (carried in its ``run_started``, kept
in its index entry). Each engine replica sweeps the run index now and then (a quarter of the
shortest retention it knows, between 0.5 s and 60 s; every 5 minutes while it knows none; the
dispatcher tells it each run's own as it folds the run's start) and
deletes what has outlived its retention; replicas deleting the same run at once do no harm
(a purge of nothing is fine). A sweep purges a run only while its history still ends where
the summary it listed does, and its history only up to there: a run started since under the
same id (another replica deleted the old one meanwhile) stays whole.

A sweep does not read the whole index, which grows with every run kept (at 1,000 runs/s, 3.6
million summaries an hour). The index keeps one summary per run, so a summary that changes
leaves its place for the stream's end, and one left in place never changes. A sweep reads
the summaries written since the last one (each once, to learn the retention it carries), and
of the older ones only those stored before the shortest retention known: a summary is
written when its run closes or later, so a newer one cannot be due yet. An engine's first
sweep, a sweep interval after it starts, reads everything once. Open runs and runs kept
longer than the shortest retention are read again at each sweep once they are that old.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Final

import anyio
import msgspec

from ._connection import ApiError, Connection
from ._errors import NatflowError, RunNotFound
from ._flow_starts import forget_cells
from ._history import HistoryStore
from ._index import IndexEntry, read_entry
from ._kv import kv_stream
from ._leases import LEASES_BUCKET
from ._lifecycle import LIFECYCLE_PREFIX, LIFECYCLE_STREAM, workflow_token
from ._names import check_run_id
from ._puller import durable_info
from ._reader import reader, stream_bounds
from ._signals import sequence, stored_at
from ._state import fold_run
from ._streams import (
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    DISPATCHER,
    HISTORY_PREFIX,
    HISTORY_STREAM,
    RUNS_STREAM,
    SIGNAL_STREAM,
    TASK_STREAM,
    ensure_streams,
    history_subject,
    runs_subject,
    signal_filter,
    task_subject,
)
from ._timers import TIMERS_BUCKET
from ._value_chunks import ORPHAN_AGE, purge_orphan_chunks
from ._value_release import release_run_values
from .events import utcnow

log = logging.getLogger("natflow.retention")

MIN_SWEEP: Final = 0.5
MAX_SWEEP: Final = 60.0
# With no retention anywhere (no engine setting, no run that carries one), the index is only
# looked through now and then, for runs of a workflow that declares its own.
IDLE_SWEEP: Final = 300.0
_PAGE: Final = 1000
_PARALLEL: Final = 16  # runs deleted at once by a sweep


class _PurgeReply(msgspec.Struct):
    success: bool = False
    purged: int = 0
    error: ApiError | None = None


_purge_decoder = msgspec.json.Decoder(_PurgeReply)


async def purge(conn: Connection, stream: str, subject: str, *, below: int | None = None) -> int:
    """Remove every message of ``stream`` on ``subject`` (wildcards allowed), or only those
    with a sequence below ``below``; how many."""
    request: dict[str, object] = {"filter": subject}
    if below is not None:
        request["seq"] = below
    msg = await conn.request(f"{conn.api}.STREAM.PURGE.{stream}", msgspec.json.encode(request))
    reply = _purge_decoder.decode(msg.data)
    if reply.error is not None:
        raise reply.error.refusal(f"purge {stream} {subject}")
    return reply.purged


async def purge_run(
    conn: Connection, run_id: str, workflow: str, queue: str, *, last_seq: int | None = None
) -> int:
    """Purge everything natflow keeps of a run (history last); messages removed.

    ``last_seq``: the run's history as it was judged closed ends there, and only that much
    of it goes: a run started since under the same id (its events are later) stays.
    """
    places = [
        (LIFECYCLE_STREAM, f"{LIFECYCLE_PREFIX}.{workflow_token(workflow)}.*.{run_id}"),
        (SIGNAL_STREAM, signal_filter(run_id)),
        (DEADLETTER_STREAM, f"{DEADLETTER_PREFIX}.*.{run_id}"),
        (kv_stream(TIMERS_BUCKET), f"$KV.{TIMERS_BUCKET}.{run_id}.>"),
        (kv_stream(LEASES_BUCKET), f"$KV.{LEASES_BUCKET}.{run_id}"),
        (TASK_STREAM, task_subject(queue, workflow, run_id)),
        (RUNS_STREAM, runs_subject(run_id)),
    ]
    # Stored values first: their markers name the run, and while history is still there a
    # delete cut short is simply run again. But not before this connection is known to be
    # allowed the purges (a client may delete values, not purge: its values went, the run
    # stayed, its result unreadable).
    await _may_purge(conn, run_id)
    await release_run_values(conn, run_id)
    await forget_cells(conn, run_id)
    removed = 0
    for stream, subject in places:
        removed += await purge(conn, stream, subject)
    below = last_seq + 1 if last_seq is not None else None
    return removed + await purge(conn, HISTORY_STREAM, history_subject(run_id), below=below)


_MAY_PURGE: Final = "natflow_may_purge"


async def _may_purge(conn: Connection, run_id: str) -> None:
    """Raise :class:`PermissionDenied` unless this connection may purge natflow's streams
    (asked once per connection: a purge of a subject no message has)."""
    if conn.extras.get(_MAY_PURGE):
        return
    await purge(conn, HISTORY_STREAM, f"{HISTORY_PREFIX}.{run_id}.none")
    conn.extras[_MAY_PURGE] = True


async def delete_run(conn: Connection, run_id: str) -> int:
    """Delete a closed run; :class:`RunNotFound` if none, :class:`NatflowError` if open."""
    check_run_id(run_id)
    await ensure_streams(conn)
    history = await HistoryStore(conn).read(run_id)
    info = fold_run(run_id, history.events)
    if info is None:
        raise RunNotFound(run_id)
    if not info.is_closed:
        # A paused run runs its cleanup only once resumed: cancelling it alone ends nothing.
        paused = " and resume it" if info.status == "paused" else ""
        raise NatflowError(
            f"run {run_id!r} is {info.status}, not closed; cancel it first{paused} "
            f"(client.cancel or `natflow cancel {run_id}`), then delete it"
        )
    await _folded(conn, history.last_seq)
    return await purge_run(conn, run_id, info.workflow, info.queue, last_seq=history.last_seq)


_FOLD_PATIENCE: Final = 5.0


async def _folded(conn: Connection, last_seq: int) -> None:
    """Wait (a while) until the engine has processed a run's history up to ``last_seq``: a
    run deleted as it closed was written back by the engine still folding its end, as a
    summary stuck "pending" and lifecycle events that kept its result. The engine
    acknowledges an event once its summary and lifecycle event are written."""
    deadline = anyio.current_time() + _FOLD_PATIENCE
    while anyio.current_time() < deadline:
        try:
            info = await durable_info(conn, HISTORY_STREAM, DISPATCHER, "reading", budget=1.0)
        except NatflowError:  # it may not be read: as before, at once
            return
        if info is None:  # no engine has run yet: nobody folds the run's end
            return
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= last_seq:
            return
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return  # nothing left to process (the floor lags filtered-out messages)
        await anyio.sleep(0.1)
    log.info("run history past #%d is not processed by an engine yet; deleting anyway", last_seq)


class RetentionService:
    """Deletes closed runs older than their retention; see the module docstring."""

    def __init__(self, conn: Connection, retention: float | None) -> None:
        self._conn = conn
        self.retention = retention
        self.deleted = 0
        self._shortest = retention
        # Every summary up to this stream sequence has been read once, for its retention.
        self._learned_until = 0
        self._first = 0  # the index's first sequence at the last sweep (it only grows)
        self._shorter = anyio.Event()  # set when a shorter retention is learned between sweeps
        self.read = 0  # summaries read by sweeps
        self._next_chunk_look = 0.0  # monotonic time of the next look for unnamed chunks

    def sweep_interval(self) -> float:
        if self._shortest is None:
            return IDLE_SWEEP
        return min(MAX_SWEEP, max(MIN_SWEEP, self._shortest / 4))

    def learn(self, retention: float | None) -> None:
        """A run's own retention, as the dispatcher folds its start or a sweep reads its
        summary: a shorter one than any known shortens the wait for the next sweep at once
        (not after the idle 5 minutes)."""
        if retention is not None and (self._shortest is None or retention < self._shortest):
            self._shortest = retention
            self._shorter.set()

    async def run(self) -> None:
        while True:
            # A sweep interval after the start, not at it: replicas restarted together would
            # otherwise each read the whole index at once (see the module docstring).
            self._shorter = anyio.Event()
            with anyio.move_on_after(self.sweep_interval()):
                await self._shorter.wait()
                await anyio.sleep(self.sweep_interval())  # the new, shorter one
            try:
                await self.sweep()
            except NatflowError as exc:
                log.warning("retention sweep failed (%s); trying again later", exc)
            if time.monotonic() >= self._next_chunk_look:
                self._next_chunk_look = time.monotonic() + ORPHAN_AGE.total_seconds()
                try:
                    await purge_orphan_chunks(self._conn)
                except NatflowError as exc:
                    log.warning("looking for unnamed value chunks failed (%s)", exc)

    async def sweep(self) -> int:
        """Delete every closed run past its retention; how many were deleted."""
        expired = await self._expired()
        limiter = anyio.CapacityLimiter(_PARALLEL)
        deleted = 0

        async def delete(entry: IndexEntry) -> None:
            nonlocal deleted
            async with limiter:
                info = entry.info
                try:
                    if not await self._still_due(entry):
                        return
                    await purge_run(
                        self._conn, info.run_id, info.workflow, info.queue, last_seq=entry.hseq
                    )
                except NatflowError as exc:
                    log.warning("run %s: retention could not delete it (%s)", info.run_id, exc)
                    return
                deleted += 1

        async with anyio.create_task_group() as tg:
            for entry in expired:
                tg.start_soon(delete, entry)
        if deleted:
            log.info("retention deleted %d closed runs", deleted)
        self.deleted += deleted
        return deleted

    async def _still_due(self, entry: IndexEntry) -> bool:
        """Whether the run's history still ends where its summary does (or is gone: what is
        left of it goes too), and has by the server's clock outlived its retention.

        Another replica may have deleted it since this sweep read the index, and a new run
        been started under the same id (an idempotency key), which the purge by id took with
        it. And ``closed_at`` is the clock of the worker that closed the run: one an hour
        behind had a run kept for 10 minutes deleted within a minute.
        """
        last = await HistoryStore(self._conn).last_stored(entry.info.run_id)
        if last is None:
            return True
        seq, stored = last
        return seq <= entry.hseq and self._past(entry, stored, utcnow())

    def _past(self, entry: IndexEntry, closed: datetime, now: datetime) -> bool:
        """Whether a run closed at ``closed`` has outlived its retention at ``now``."""
        keep = entry.retention if entry.retention is not None else self.retention
        return keep is not None and closed + timedelta(seconds=keep) <= now

    async def _expired(self) -> list[IndexEntry]:
        """The closed runs past their retention, reading only what can hold them: the
        summaries written since the last sweep (each seen once, for the retention it
        carries), and the older ones stored before the shortest retention (a summary is
        written when, or after, its run closed, so a newer one cannot be due)."""
        now = utcnow()
        bounds = await stream_bounds(self._conn, RUNS_STREAM)
        if bounds is None:  # no index yet: no closed runs
            return []
        first, last = bounds
        if last < self._learned_until or first < self._first:
            self._learned_until = 0  # the index was deleted and rebuilt: learn it again
        self._first = first
        learned = self._learned_until
        found = [entry async for entry in self._due(max(first, learned + 1), last, now)]
        self._learned_until = max(learned, last)
        if self._shortest is not None and learned >= first:
            cutoff = now - timedelta(seconds=self._shortest)
            found += [entry async for entry in self._due(first, learned, now, stored_by=cutoff)]
        return found

    async def _due(
        self, start: int, end: int, now: datetime, *, stored_by: datetime | None = None
    ) -> AsyncIterator[IndexEntry]:
        """The summaries from ``start`` to ``end`` (stream sequences) that are past their
        retention, up to the first one stored after ``stored_by``; learns the shortest
        retention of those read."""
        while start <= end:
            page = await reader(self._conn).read(
                RUNS_STREAM, start=start, batch=min(_PAGE, end - start + 1), headers=True
            )
            for msg in page.messages:
                if sequence(msg) > end or (stored_by is not None and stored_at(msg) > stored_by):
                    return
                self.read += 1
                entry = read_entry(msg.data, f"#{sequence(msg)}")
                if entry is None:
                    continue
                self.learn(entry.retention)
                closed = entry.info.closed_at
                if closed is not None and self._past(entry, closed, now):
                    yield entry
            if not page.messages:
                return
            start = page.last_seq + 1
