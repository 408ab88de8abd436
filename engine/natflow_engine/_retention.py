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
shortest retention it knows, between 0.5 s and 60 s; every 5 minutes while it knows none) and
deletes what has outlived its retention; replicas deleting the same run at once do no harm
(a purge of nothing is fine).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Final

import anyio
import msgspec

from ._connection import Connection, JetStreamError
from ._errors import NatflowError, RunNotFound
from ._history import HistoryStore
from ._index import IndexEntry
from ._kv import kv_stream
from ._leases import LEASES_BUCKET
from ._lifecycle import LIFECYCLE_PREFIX, LIFECYCLE_STREAM, workflow_token
from ._names import check_run_id
from ._reader import reader
from ._state import fold_run
from ._streams import (
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
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
    error: dict[str, object] | None = None


_purge_decoder = msgspec.json.Decoder(_PurgeReply)
_entry_decoder = msgspec.json.Decoder(IndexEntry)


async def purge(conn: Connection, stream: str, subject: str, *, below: int | None = None) -> int:
    """Remove every message of ``stream`` on ``subject`` (wildcards allowed), or only those
    with a sequence below ``below``; how many."""
    request: dict[str, object] = {"filter": subject}
    if below is not None:
        request["seq"] = below
    msg = await conn.request(f"{conn.api}.STREAM.PURGE.{stream}", msgspec.json.encode(request))
    reply = _purge_decoder.decode(msg.data)
    if reply.error is not None:
        err = reply.error
        raise JetStreamError(
            f"purge {stream} {subject}",
            int(str(err.get("code", 0))),
            int(str(err.get("err_code", 0))),
            str(err.get("description", "")),
        )
    return reply.purged


async def purge_run(conn: Connection, run_id: str, workflow: str, queue: str) -> int:
    """Purge everything natflow keeps of a run (history last); messages removed."""
    places = [
        (LIFECYCLE_STREAM, f"{LIFECYCLE_PREFIX}.{workflow_token(workflow)}.*.{run_id}"),
        (SIGNAL_STREAM, signal_filter(run_id)),
        (DEADLETTER_STREAM, f"{DEADLETTER_PREFIX}.*.{run_id}"),
        (kv_stream(TIMERS_BUCKET), f"$KV.{TIMERS_BUCKET}.{run_id}.>"),
        (kv_stream(LEASES_BUCKET), f"$KV.{LEASES_BUCKET}.{run_id}"),
        (TASK_STREAM, task_subject(queue, workflow, run_id)),
        (RUNS_STREAM, runs_subject(run_id)),
        (HISTORY_STREAM, history_subject(run_id)),
    ]
    # Stored values first: their markers name the run, and while history is still there a
    # delete cut short is simply run again.
    await release_run_values(conn, run_id)
    removed = 0
    for stream, subject in places:
        removed += await purge(conn, stream, subject)
    return removed


async def delete_run(conn: Connection, run_id: str) -> int:
    """Delete a closed run; :class:`RunNotFound` if none, :class:`NatflowError` if open."""
    check_run_id(run_id)
    await ensure_streams(conn)
    history = await HistoryStore(conn).read(run_id)
    info = fold_run(run_id, history.events)
    if info is None:
        raise RunNotFound(run_id)
    if not info.is_closed:
        raise NatflowError(
            f"run {run_id!r} is {info.status}, not closed; cancel it first "
            f"(client.cancel or `natflow cancel {run_id}`), then delete it"
        )
    return await purge_run(conn, run_id, info.workflow, info.queue)


class RetentionService:
    """Deletes closed runs older than their retention; see the module docstring."""

    def __init__(self, conn: Connection, retention: float | None) -> None:
        self._conn = conn
        self.retention = retention
        self.deleted = 0
        self._shortest = retention

    def sweep_interval(self) -> float:
        if self._shortest is None:
            return IDLE_SWEEP
        return min(MAX_SWEEP, max(MIN_SWEEP, self._shortest / 4))

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except NatflowError as exc:
                log.warning("retention sweep failed (%s); trying again later", exc)
            await anyio.sleep(self.sweep_interval())

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
                    await purge_run(self._conn, info.run_id, info.workflow, info.queue)
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

    async def _expired(self) -> list[IndexEntry]:
        now = utcnow()
        found: list[IndexEntry] = []
        start = 1
        while True:
            page = await reader(self._conn).read(RUNS_STREAM, start=start, batch=_PAGE)
            for msg in page.messages:
                entry = _entry_decoder.decode(msg.data)
                keep = entry.retention if entry.retention is not None else self.retention
                if entry.retention is not None and (
                    self._shortest is None or entry.retention < self._shortest
                ):
                    self._shortest = entry.retention
                closed = entry.info.closed_at
                if (
                    keep is not None
                    and closed is not None
                    and closed + timedelta(seconds=keep) <= now
                ):
                    found.append(entry)
            if len(page.messages) >= page.pending or not page.messages:  # see _reader
                return found
            start = page.last_seq + 1
