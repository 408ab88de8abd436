"""What the console shows, read from JetStream with the engine's own readers.

The runs list pages backwards through the run index stream (``NATFLOW_RUNS``, one summary per
run, in order of last update): a page costs the entries it reads, never the size of the
index, so it stays fast with 100,000 runs. Filters scan a bounded window per request and
hand back a cursor to go on from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from .._connection import Connection
from .._errors import NatflowError, RunNotFound
from .._history import CorruptHistory, HistoryStore, current_stretch
from .._index import IndexEntry, read_entry, summaries_of
from .._input_schema import announced
from .._kv import kv_entries
from .._leases import LEASES_BUCKET, Lease, decode_lease
from .._limits import explain as explain_wait
from .._limits import explain_all
from .._names import check_run_id
from .._reader import reader, stream_bounds
from .._registry import WorkerInfo, list_workers
from .._runs import held_as_corrupt
from .._sealing import open_events
from .._signals import DeadLetter, dead_letters
from .._site_index import site_run, site_runs
from .._state import RunInfo, StepInfo, fold_run, fold_steps
from .._streams import HISTORY_STREAM, RUNS_STREAM, ensure_streams, history_subject, runs_subject
from .._undecodable import UNDECODABLE
from ..events import Event, decode_event, unpacked
from ._counts import Row, StatusCounts

log = logging.getLogger("natflow.console")

PAGE_SIZE: Final = 50
_WINDOW: Final = 500  # index entries read per request while filtering
_RESELECT: Final = 3  # pages made again at most, each without the deleted runs it found
SCAN_BUDGET: Final = 20_000  # entries one filtered page may read before it hands back a cursor


@dataclass(frozen=True, slots=True)
class RunFilter:
    """The runs page's filters; ``None`` means "any"."""

    id_contains: str | None = None  # part of a run id
    workflow: str | None = None
    status: str | None = None
    queue: str | None = None
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before

    def matches(self, run: RunInfo | Row) -> bool:
        return (
            (self.id_contains is None or self.id_contains in run.run_id)
            and (self.workflow is None or run.workflow == self.workflow)
            and (self.status is None or run.status == self.status)
            and (self.queue is None or run.queue == self.queue)
            and (self.since is None or run.created_at >= self.since)
            and (self.until is None or run.created_at < self.until)
        )

    @property
    def active(self) -> bool:
        wanted = (self.id_contains, self.workflow, self.status, self.queue, self.since, self.until)
        return any(v is not None for v in wanted)


@dataclass(slots=True)
class RunPage:
    """One page of runs, most recently updated first."""

    runs: list[RunInfo] = field(default_factory=list)
    older: int | None = None  # cursor: pass as ``before`` for the next page (None: no more)
    scanned: int = 0  # index entries read to make this page
    exhausted_budget: bool = False  # stopped at the scan budget before the page was full
    matching: int | None = None  # how many runs match in all (when the live index knows)
    offset: int = 0  # position of the first run shown among the matching ones


async def select_runs(
    conn: Connection, counts: StatusCounts, where: RunFilter, offset: int, size: int = PAGE_SIZE
) -> RunPage:
    """A filtered page from the console's live index: any page costs the same. Runs whose
    summary is gone (deleted) leave the live index, and the page is made again without them."""
    for _ in range(_RESELECT):
        ids, matching = counts.select(where.matches, offset, size)
        runs = await summaries_of(conn, ids)
        if len(runs) == len(ids):
            break
        found = {run.run_id for run in runs}
        counts.forget([run_id for run_id in ids if run_id not in found])
    return RunPage(runs=runs, matching=matching, offset=offset)


async def _window(conn: Connection, start: int, end: int) -> list[tuple[int, IndexEntry]]:
    """Index entries stored at sequences ``start..end``, newest first."""
    page = await reader(conn).read(RUNS_STREAM, start=start, batch=end - start + 1, headers=True)
    found: list[tuple[int, IndexEntry]] = []
    for msg in page.messages:
        seq = int((msg.headers or {}).get("Nats-Sequence", "0"))
        if seq > end:
            break
        entry = read_entry(msg.data, f"#{seq}")
        if entry is not None:
            found.append((seq, entry))
    found.reverse()
    return found


async def list_runs(
    conn: Connection, where: RunFilter, *, before: int | None = None, size: int = PAGE_SIZE
) -> RunPage:
    """The newest ``size`` runs matching ``where`` below index sequence ``before``."""
    result = await _list_hub_runs(conn, where, before=before, size=size)
    if before is None:  # at a hub with sites: their runs on the first page, newest first
        there = [run for run in await site_runs(conn) if where.matches(run)]
        if there:
            merged = sorted([*result.runs, *there], key=lambda r: r.updated_at, reverse=True)
            result.runs = merged[:size]
    await explain_all(conn, result.runs)  # waiting for a concurrency slot, as a run's page says
    return result


async def _list_hub_runs(
    conn: Connection, where: RunFilter, *, before: int | None, size: int
) -> RunPage:
    first, last = await stream_bounds(conn, RUNS_STREAM) or (1, 0)  # no index: no runs
    top = last if before is None else min(last, before - 1)
    result = RunPage()
    window = size if not where.active else _WINDOW
    while top >= first:
        start = max(first, top - window + 1)
        entries = await _window(conn, start, top)
        result.scanned += top - start + 1
        for seq, entry in entries:
            if where.matches(entry.info):
                result.runs.append(entry.info)
                if len(result.runs) == size:
                    result.older = seq if seq > first else None
                    return result
            if where.since is not None and entry.info.updated_at < where.since:
                return result  # the index is in update order: the rest is older still
        top = start - 1
        if result.scanned >= SCAN_BUDGET and top >= first:
            result.older, result.exhausted_budget = top + 1, True
            return result
        window = _WINDOW
    return result


async def find_run(conn: Connection, run_id: str) -> RunInfo | None:
    """A run's index entry by exact id (None when the index has none)."""
    msg = await conn.request(f"{conn.api}.DIRECT.GET.{RUNS_STREAM}.{runs_subject(run_id)}", b"")
    if "Status" in (msg.headers or {}):
        return None
    entry = read_entry(msg.data, f"run {run_id}")
    return entry.info if entry is not None else None


@dataclass(slots=True)
class RunView:
    """Everything the run page shows, folded from one read of the run's history."""

    info: RunInfo
    events: list[Event]
    steps: list[StepInfo]
    last_seq: int
    lease: Lease | None = None
    children: list[RunInfo] = field(default_factory=list)


async def read_run(conn: Connection, run_id: str) -> RunView:
    """Read and fold a run's history; :class:`RunNotFound` if it has none."""
    check_run_id(run_id)
    await ensure_streams(conn)
    # Leniently: a run whose history holds an event this version cannot decode is shown as
    # blocked, as a worker holds it, with cancel and terminate at hand (the page was a 502).
    history = await HistoryStore(conn).read(run_id, lenient=True)
    events = _opened(conn, history.events, run_id)
    info = fold_run(run_id, events)
    if info is None and history.corrupt:  # not even its start decodes: nothing to show
        seq, reason = history.corrupt[0]
        raise CorruptHistory(
            run_id, seq, reason, last_seq=history.last_seq, count=len(history.corrupt), last=None
        )
    if info is None:
        elsewhere = await site_run(conn, run_id)  # at a hub: a site's run, its summary only
        if elsewhere is None:
            raise RunNotFound(run_id)
        return RunView(info=elsewhere, events=[], steps=[], last_seq=0)
    if history.corrupt and not info.is_closed:
        held_as_corrupt(info, *history.corrupt[0])
        return RunView(info, events, fold_steps(events), history.last_seq)
    await explain_wait(conn, info)  # waiting for a concurrency slot: which, how full
    return RunView(
        info=info,
        events=events,
        steps=fold_steps(events),
        last_seq=history.last_seq,
    )


def _opened(conn: Connection, events: list[Event], run_id: str) -> list[Event]:
    """Sealed values opened with the console's keys (``NATFLOW_CODEC_KEYS``); those it holds
    no key for stay sealed and show as "encrypted (key k2)"."""
    return open_events(conn.codec, events, run_id, strict=False)


async def read_more(conn: Connection, view: RunView) -> RunView:
    """``view`` with the events appended since it was read (one batch read of the new ones)."""
    run_id = view.info.run_id
    page = await reader(conn).read_all(
        HISTORY_STREAM, history_subject(run_id), start=view.last_seq + 1, headers=True
    )
    if not page.messages:
        return view
    decoded, corrupt = [], []
    for msg in page.messages:
        try:
            decoded.append(decode_event(msg.data))
        except UNDECODABLE as exc:
            corrupt.append((int((msg.headers or {}).get("Nats-Sequence", "0")), str(exc)))
    added = _opened(conn, unpacked(decoded), run_id)
    events = current_stretch(view.events + added)  # a continuation meanwhile: its stretch only
    info = fold_run(run_id, events)
    assert info is not None  # it had a start event already
    if corrupt and not info.is_closed:
        held_as_corrupt(info, *corrupt[0])
        return RunView(info, events, fold_steps(events), page.last_seq)
    await explain_wait(conn, info)
    return RunView(info=info, events=events, steps=fold_steps(events), last_seq=page.last_seq)


async def leases(conn: Connection) -> list[Lease]:
    """Every run lease now held (runs a worker is executing)."""
    found: list[Lease] = []
    for msg in await kv_entries(conn, LEASES_BUCKET):
        try:
            found.append(decode_lease(msg.data))
        except UNDECODABLE:
            continue
    return found


async def workers(conn: Connection) -> list[tuple[WorkerInfo, list[Lease]]]:
    """Live workers, each with the leases (runs) it holds now."""
    await ensure_streams(conn)
    found = await list_workers(conn)
    held = await leases(conn)
    return [(w, [lease for lease in held if lease.worker == w.identity]) for w in found]


async def input_schemas(conn: Connection) -> dict[str, tuple[str, object | None]]:
    """Each workflow some live worker serves: ``(queue, input JSON Schema or None)``."""
    await ensure_streams(conn)
    known: dict[str, tuple[str, object | None]] = {}
    workers = await list_workers(conn)
    for worker in workers:
        for name in worker.workflows:
            if name not in known:
                # The queue it serves this workflow on (its first queue started runs of a
                # workflow served on its second where nobody takes them).
                queues = worker.queues_of(name) or worker.queues or ["default"]
                known[name] = (queues[0], announced(workers, name))
    return known


async def dead(conn: Connection, limit: int = 200) -> list[DeadLetter]:
    await ensure_streams(conn)
    try:
        return await dead_letters(conn, limit)
    except NatflowError:
        raise
    except Exception as exc:
        raise NatflowError(f"could not read dead letters: {exc}") from exc
