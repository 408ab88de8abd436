"""The run index behind ``list``: the latest summary of each run, a projection of history.

The engine folds every run-level event (``natflow.history.*.run``, and each start stored on
its start subject, ``natflow.history.*.start.>``) into a summary and
stores it on ``natflow.runs.<run_id>`` (one message per run). Each summary remembers the
history sequence it reflects, and writes are conditional on the summary's own sequence, so
several engine replicas can index at once without going backwards. On a single server
the stream is acknowledged before its fsync; ``_index_guard`` rewrites what a power cut takes
from it, and rebuilds a new (or removed and created anew) index from the whole history.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Final

import msgspec

from ._append_batch import appender
from ._connection import Connection, JetStreamError, retrying
from ._errors import InvalidInput
from ._level_read import own_start
from ._limits import explain_all
from ._metrics import RUNS_STARTED
from ._quarantine import quarantined
from ._reader import reader, stream_bounds
from ._site_index import site_runs
from ._state import RUN_STATUSES, RunInfo, apply_event, mark_due, new_info
from ._streams import HISTORY_STREAM, RUNS_STREAM, run_level_subject, runs_subject
from ._undecodable import UNDECODABLE
from .events import (
    Event,
    RunContinued,
    RunStarted,
    SignalWaited,
    StepRetrying,
    TimerScheduled,
    decode_event,
)

log = logging.getLogger("natflow.index")

_CACHE_SIZE: Final = 10_000
_PAGE: Final = 1000
# Summaries a list reads at most, newest first (a list reads them all to filter and count).
SCAN_LIMIT: Final = 200_000


class IndexEntry(msgspec.Struct, kw_only=True):
    v: int = 1
    hseq: int
    info: RunInfo
    retention: float | None = None  # seconds a closed run is kept (its workflow's override)
    # Whether history has shown the run a timer (see :func:`makes_timer`): a run that never
    # had one has none in KV to drop when it ends. None: not known (a summary written before
    # this field existed), so the engine looks, as it always did.
    timers: bool | None = None
    # Whether the run's start names an ``on_complete`` workflow: a replica that did not fold
    # the start reads it at the run's end only if so. None: not known (an older summary).
    on_complete: bool | None = None


def makes_timer(event: Event) -> bool:
    """Whether the event puts (or may have put) a timer of its run in KV: a delayed start,
    a sleep, a wait with a timeout, a retry's wait; and a continuation, whose older stretches
    had timers this engine may not have seen. The dispatcher folds every such event into the
    index before the run's end (a worker writes timers only for events history holds)."""
    if isinstance(event, RunStarted):
        return isinstance(event, RunContinued) or event.not_before is not None
    if isinstance(event, SignalWaited):
        return event.timeout_at is not None
    return isinstance(event, TimerScheduled | StepRetrying)


def _first_summary(run_id: str, start: RunStarted) -> RunInfo:
    """The summary a run's first event (a start, or a continuation's) gives it."""
    info = new_info(run_id, start)
    if not isinstance(start, RunContinued):
        info.current = None  # as the index always had it for a start
    return info


# Called before a summary whose status changed is written: (previous status, summary, hseq).
StatusHook = Callable[[str | None, RunInfo, int], Awaitable[None]]


_entry_encoder = msgspec.json.Encoder()
_entry_decoder = msgspec.json.Decoder(IndexEntry)


def read_entry(data: bytes, where: str) -> IndexEntry | None:
    """A run summary from the index, or None (counted and logged once) where it does not
    decode: written by a newer natflow (a status this one does not know) or by something
    else. Every reader of the index skips such a summary rather than fail on it."""
    try:
        return _entry_decoder.decode(data)
    except UNDECODABLE as exc:
        quarantined("index_entry", where, f"run index summary does not decode ({exc}); skipped")
        return None


class RunIndex:
    """Reads and (in the engine) writes the run index."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._writes = appender(conn, RUNS_STREAM)  # many runs' summaries: one batch
        self._cache: OrderedDict[str, tuple[IndexEntry, int]] = OrderedDict()

    async def apply(
        self, run_id: str, event: Event, hseq: int, on_status: StatusHook | None = None
    ) -> RunInfo | None:
        """Fold one run-level event (stream sequence ``hseq``) into the run's summary.

        Returns the new summary, or None if the index had the event already (a redelivery,
        another replica) or cannot place it yet: so each event is counted once. ``on_status``
        runs before a summary whose status changed is written, so an engine that dies in
        between calls it again for the redelivered event (its effects must be idempotent).
        """
        # A new run has no summary yet: write it expecting none, without reading first (the
        # write is conditional, so one that exists after all sends this round to a read).
        unread = isinstance(event, RunStarted) and run_id not in self._cache
        told: str | None = None  # the status ``on_status`` was called for
        for _ in range(5):
            current = None if unread else await self._current(run_id)
            entry, seq = current if current is not None else (None, 0)
            if entry is not None and entry.hseq >= hseq:
                return None
            previous = entry.info.status if entry is not None else None
            retention = entry.retention if entry is not None else None
            had_timers = entry.timers if entry is not None else False
            hooked = entry.on_complete if entry is not None else None
            if entry is None and not isinstance(event, RunStarted):
                # The run's start was taken by an engine that died before folding it (it comes
                # back only after its ack deadline), or by another replica still at it: fold
                # the run-level history up to this event instead of losing the event.
                rebuilt = await self._rebuild(run_id, hseq)
                if rebuilt is None:
                    return None  # no start stored before this event: nothing to place it on
                info, start, had_timers, _ = rebuilt
                # Its start, folded here, is skipped when it comes (the summary is newer):
                # counted now, or natflow_runs_started_total fell behind the runs closed.
                if not isinstance(start, RunContinued):
                    RUNS_STARTED.labels(info.workflow).inc()
                retention, hooked = start.retention, start.on_complete is not None
            elif entry is None:
                assert isinstance(event, RunStarted)
                info = _first_summary(run_id, event)  # a run_continued too (the index was lost)
                retention, hooked = event.retention, event.on_complete is not None
            else:
                # A copy: should the hook or the write fail, the cached summary is unchanged.
                info = msgspec.structs.replace(entry.info)
                apply_event(info, event)
                if isinstance(event, RunStarted):  # a continuation names its own
                    hooked = event.on_complete is not None
            if on_status is not None and info.status not in (previous, told):
                await on_status(previous, info, hseq)
                # A write that met another replica's goes round again; the hook's effects
                # are keyed by ``hseq`` (the lifecycle message id), so a second call for the
                # same status would be dropped by the server anyway.
                told = info.status
            has_timers = True if makes_timer(event) else had_timers
            new = IndexEntry(
                hseq=hseq, info=info, retention=retention, timers=has_timers, on_complete=hooked
            )
            if not await self._write(run_id, new, seq):
                unread = False  # another replica wrote: read and decide again
                continue
            return info
        log.warning("run %s: index kept changing under this engine; skipped", run_id)
        return None

    async def restore(self, run_id: str) -> bool:
        """Rewrite the run's summary from its run-level history if the index holds none or
        an older one than history's last run-level event: after the index lost writes it
        had acknowledged (see ``_index_guard``). True if it wrote one.

        Writes nothing else: each status change's lifecycle event was stored, fsynced,
        before the summary that lost it was written.
        """
        self._cache.pop(run_id, None)  # what this engine remembers may be what was lost
        for _ in range(5):
            rebuilt = await self._rebuild(run_id, None)
            if rebuilt is None:
                return False  # no start (deleted since, or not a run natflow wrote)
            info, start, has_timers, hseq = rebuilt
            current = await self._current(run_id)
            entry, seq = current if current is not None else (None, 0)
            if entry is not None and entry.hseq >= hseq:
                return False
            new = IndexEntry(
                hseq=hseq,
                info=info,
                retention=start.retention,
                timers=has_timers,
                on_complete=start.on_complete is not None,
            )
            if await self._write(run_id, new, seq):
                return True
            # the dispatcher wrote meanwhile: look again
        return False

    async def _write(self, run_id: str, entry: IndexEntry, seq: int) -> bool:
        """Store ``entry`` if the run's summary is still the one at ``seq`` (0: none); False
        if another write came first (what this engine remembers of the run is dropped)."""
        try:
            ack = await self._writes.publish(
                runs_subject(run_id),
                _entry_encoder.encode(entry),
                {"Nats-Expected-Last-Subject-Sequence": str(seq)},
            )
        except JetStreamError as exc:
            self._cache.pop(run_id, None)
            if not exc.wrong_last_sequence:
                raise
            return False
        self._remember(run_id, entry, ack.seq)
        return True

    def forget(self) -> None:
        """Drop every summary this engine remembers: the server may have lost some."""
        self._cache.clear()

    async def _rebuild(
        self, run_id: str, hseq: int | None
    ) -> tuple[RunInfo, RunStarted, bool, int] | None:
        """The summary of the run's run-level events up to ``hseq`` (stream sequence; None:
        all of them), as :meth:`apply` would have folded them one by one; the run's start,
        whether any event made a timer, and the sequence of the last event folded. None if
        no start is stored before it."""
        runs = reader(self._conn)
        page, own = await asyncio.gather(
            runs.read_all(HISTORY_STREAM, run_level_subject(run_id), headers=True),
            own_start(runs, run_id),
        )
        messages = [*own, *page.messages]  # a start on its own subject comes before them all
        folded: list[Event] = []
        last = 0
        for msg in messages:
            seq = int((msg.headers or {}).get("Nats-Sequence", "0"))
            if hseq is None or seq <= hseq:
                try:
                    folded.append(decode_event(msg.data))
                except UNDECODABLE as exc:  # foreign: skipped, as the dispatcher does
                    where = f"{(msg.headers or {}).get('Nats-Subject', run_id)} #{seq}"
                    quarantined("dispatcher_event", where, str(exc), logger=log)
                    continue
                last = max(last, seq)
        if not folded or not isinstance(folded[0], RunStarted):
            return None
        start = folded[0]
        info = _first_summary(run_id, start)
        for event in folded[1:]:
            apply_event(info, event)
        log.info("run %s: summary rebuilt from %d events of its history", run_id, len(folded))
        return info, start, any(makes_timer(event) for event in folded), last

    async def get(self, run_id: str) -> RunInfo | None:
        """The run's summary as the index holds it (None if the index has no entry)."""
        current = await self._current(run_id)
        return current[0].info if current is not None else None

    async def mark_due(self, run_id: str, timer: str, due_at: datetime) -> bool:
        """Say in the index that the run's timer is due and no worker has taken the run.

        Changes nothing unless the summary still waits for exactly that timer (a claim, or a
        newer sleep, since then wins). True if it marked the run.
        """
        for _ in range(5):
            current = await self._current(run_id)
            if current is None:
                return False
            entry, seq = current
            info = entry.info
            if info.status not in ("sleeping", "waiting") or info.due_at != due_at:
                return False
            mark_due(info, timer)
            if await self._write(run_id, msgspec.structs.replace(entry, info=info), seq):
                return True
        return False

    def has_no_timers(self, run_id: str) -> bool:
        """Whether the summary this engine last read or wrote for the run says it never had
        a timer. False when it does not know (nothing cached, or an older summary)."""
        cached = self._cache.get(run_id)
        return cached is not None and cached[0].timers is False

    def may_have_on_complete(self, run_id: str) -> bool:
        """Whether the run may name an ``on_complete`` workflow: False only when the summary
        this engine last read or wrote for it says its start names none."""
        cached = self._cache.get(run_id)
        return cached is None or cached[0].on_complete is not False

    def moved_on_since(self, run_id: str, hseq: int) -> bool:
        """Whether the summary this engine last read or wrote reflects an event of the run
        after ``hseq`` (so something, a claim or the run's end, followed that event)."""
        cached = self._cache.get(run_id)
        return cached is not None and cached[0].hseq > hseq

    def closed_since(self, run_id: str, hseq: int) -> bool:
        """Whether the summary this engine last read or wrote shows the run closed by an
        event after ``hseq`` (an older event of it redelivered, or read by a slower replica)."""
        cached = self._cache.get(run_id)
        return cached is not None and cached[0].hseq > hseq and cached[0].info.is_closed

    def _remember(self, run_id: str, entry: IndexEntry, seq: int) -> None:
        self._cache[run_id] = (entry, seq)
        self._cache.move_to_end(run_id)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _current(self, run_id: str) -> tuple[IndexEntry, int] | None:
        cached = self._cache.get(run_id)
        if cached is not None:
            return cached
        msg = await self._conn.request(
            f"{self._conn.api}.DIRECT.GET.{RUNS_STREAM}.{runs_subject(run_id)}", b""
        )
        headers = msg.headers or {}
        if "Status" in headers:
            return None
        entry = read_entry(msg.data, f"run {run_id}")
        if entry is None:  # rewritten from history at the next fold
            return None
        found = (entry, int(headers["Nats-Sequence"]))
        self._remember(run_id, *found)
        return found

    async def scan(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        explain: bool = True,
    ) -> list[RunInfo]:
        """Runs matching the filters, newest first; an unknown status is :class:`InvalidInput`.
        Over :data:`SCAN_LIMIT` summaries, only the newest are looked at (a warning says so).
        With ``explain``, a run that waits for a concurrency slot says so, as ``describe``
        does (one more read for the page)."""
        found, _, looked = await self.page(
            workflow=workflow, status=status, limit=limit, explain=explain
        )
        if looked is not None:
            log.warning(
                "the run index holds more than %d summaries; the list looked at the newest "
                "%d (set a retention to keep it smaller; the console pages through all)",
                SCAN_LIMIT,
                looked,
            )
        return found

    async def page(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 100,
        explain: bool = True,
    ) -> tuple[list[RunInfo], int, int | None]:
        """The newest ``limit`` runs matching the filters, how many match in all, and how
        many summaries were looked at if that was not all of them (over
        :data:`SCAN_LIMIT`: the count and the filters cover those)."""
        if status is not None and status not in RUN_STATUSES:
            raise InvalidInput(
                f"unknown run status {status!r}; use one of {', '.join(RUN_STATUSES)}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidInput(f"limit must be an int of at least 1, not {limit!r}")
        if workflow is not None and not isinstance(workflow, str):
            raise InvalidInput(f"workflow must be a workflow's name, not {workflow!r}")
        # Through a cluster's election (a few seconds), as a run's own reads are.
        return await retrying(
            "listing runs", lambda: self._page_once(workflow, status, limit, explain)
        )

    async def _page_once(
        self, workflow: str | None, status: str | None, limit: int, explain: bool
    ) -> tuple[list[RunInfo], int, int | None]:
        bounds = await stream_bounds(self._conn, RUNS_STREAM)
        if bounds is None:  # no index yet: no runs yet
            return [], 0, None
        first, last = bounds
        # Newest summary of each run by its stream sequence: a summary rewritten while the
        # scan goes on leaves its place (one message per run) for the stream's end, so the
        # scan may meet it twice, or only there: what came after ``last`` is read at the end.
        newest: dict[str, tuple[int, RunInfo]] = {}

        def keep(entries: list[tuple[int, IndexEntry]]) -> None:
            for seq, entry in entries:
                seen = newest.get(entry.info.run_id)
                if seen is None or seen[0] < seq:
                    newest[entry.info.run_id] = (seq, entry.info)

        end = last
        start = max(first, last - _PAGE + 1)
        scanned = 0
        while last >= first and scanned < SCAN_LIMIT:
            keep(await self._page(start, last - start + 1))
            scanned += last - start + 1
            last = start - 1
            start = max(first, last - _PAGE + 1)
        cut_short = last >= first  # older summaries left unread
        keep(await self._page(end + 1, _PAGE, bounded=False))
        found = [
            run
            for _, run in newest.values()
            if (workflow is None or run.workflow == workflow)
            and (status is None or run.status == status)
        ]
        # At a hub with sites: the sites' runs too, as the hub last copied them.
        found += [
            run
            for run in await site_runs(self._conn)
            if (workflow is None or run.workflow == workflow)
            and (status is None or run.status == status)
        ]
        found.sort(key=lambda r: r.created_at, reverse=True)
        if explain:
            await explain_all(self._conn, found[:limit])
        return found[:limit], len(found), scanned if cut_short else None

    async def _page(
        self, start: int, count: int, *, bounded: bool = True
    ) -> list[tuple[int, IndexEntry]]:
        """Up to ``count`` summaries from stream sequence ``start`` on, with their sequences;
        ``bounded``: only those below ``start + count``."""
        end = start + count - 1 if bounded else None
        page = await reader(self._conn).read_all(
            RUNS_STREAM, start=start, limit=count, headers=True
        )
        entries: list[tuple[int, IndexEntry]] = []
        for msg in page.messages:  # a summary rewritten since left a gap: the batch runs on
            seq = int((msg.headers or {}).get("Nats-Sequence", "0"))
            if end is None or seq <= end:
                entry = read_entry(msg.data, f"#{seq}")
                if entry is not None:
                    entries.append((seq, entry))
        return entries


async def summaries_of(conn: Connection, run_ids: list[str]) -> list[RunInfo]:
    """The index entries of these runs (one batch read), in the order asked."""
    if not run_ids:
        return []
    page = await reader(conn).read_last(RUNS_STREAM, [runs_subject(r) for r in run_ids])
    found: dict[str, RunInfo] = {}
    for msg in page.messages:
        entry = read_entry(msg.data, msg.subject)
        if entry is not None:
            found[entry.info.run_id] = entry.info
    return [found[r] for r in run_ids if r in found]
