"""Live counts of runs per status (and the workflows and queues seen), for the runs page.

At start the console reads the whole run index once, in large batches, then follows every
summary the engine writes (``natflow.runs.>``) as it is published. Each summary carries the
history sequence it reflects, so an older one arriving late never overwrites a newer one.
Every ``refresh`` seconds (and whenever it fell behind the live updates) it reads the index
again into a fresh tally and swaps it in, so runs deleted from the index drop out too.

A delete (``client.delete``, retention) purges the run's summary and publishes nothing, so
those runs stayed counted until the next refresh, up to 10 minutes. Two things find them
sooner: a filtered page drops the rows whose summary it finds gone (:meth:`forget`), and a
check every ``check`` seconds (one stream info) reads the index again as soon as it holds
fewer summaries than the tally has rows; as a load of a large index costs more, not sooner
after a load than ``_LOAD_SHARE`` times as long as that load took.
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Callable
from typing import Final

import anyio
import msgspec
from nats.aio.msg import Msg

from .._connection import Connection
from .._errors import NatflowError
from .._index import IndexEntry
from .._reader import BATCH, reader, stream_bounds, stream_size
from .._streams import RUNS_PREFIX, RUNS_STREAM
from .._undecodable import UNDECODABLE

log = logging.getLogger("natflow.console")

_entry_decoder = msgspec.json.Decoder(IndexEntry)
_RETRY: Final = 2.0
_REFRESH: Final = 600.0
_CHECK: Final = 2.0  # seconds between checks of the index's size
_LOAD_SHARE: Final = 20  # at most 1/20 of the time spent reading the whole index again
_BUFFER: Final = 100_000  # live updates held while the index loads


class Row:
    """What the console keeps in memory of one run: enough to count and filter it."""

    __slots__ = ("created_at", "hseq", "queue", "run_id", "status", "updated_at", "workflow")

    def __init__(self, entry: IndexEntry) -> None:
        info = entry.info
        # interned: 100,000 rows share a handful of workflow, queue and status strings
        self.run_id, self.hseq, self.status = info.run_id, entry.hseq, sys.intern(info.status)
        self.workflow, self.queue = sys.intern(info.workflow), sys.intern(info.queue)
        self.created_at, self.updated_at = info.created_at, info.updated_at


class _Tally:
    """One complete picture of the index: a row per run and the counts over them."""

    def __init__(self) -> None:
        self.runs: dict[str, Row] = {}
        self.by_status: Counter[str] = Counter()
        self.workflows: Counter[str] = Counter()
        self.queues: Counter[str] = Counter()
        self.children: dict[str, list[str]] = {}  # parent run id -> child run ids

    def apply(self, entry: IndexEntry) -> bool:
        """Fold one summary in; False if it is not newer than what the tally has."""
        info = entry.info
        old = self.runs.get(info.run_id)
        if old is not None:
            if old.hseq >= entry.hseq:
                return False
            self.by_status[old.status] -= 1
        else:
            self.workflows[info.workflow] += 1
            self.queues[info.queue] += 1
            if info.parent is not None:
                self.children.setdefault(info.parent, []).append(info.run_id)
        self.runs[info.run_id] = Row(entry)
        self.by_status[info.status] += 1
        return True

    def forget(self, run_id: str) -> bool:
        """Drop a run the index no longer holds; False if the tally had none."""
        row = self.runs.pop(run_id, None)
        if row is None:
            return False
        self.by_status[row.status] -= 1
        for seen, name in ((self.workflows, row.workflow), (self.queues, row.queue)):
            seen[name] -= 1
            if seen[name] <= 0:  # no run of it left: not offered as a filter any more
                del seen[name]
        return True


class _FellBehind(Exception):
    """More live updates arrived than could be held: read the whole index again."""


class StatusCounts:
    """Counts of runs per status, kept current, and a small row per run for filtering."""

    def __init__(self, *, refresh: float = _REFRESH, check: float = _CHECK) -> None:
        self._tally = _Tally()
        self._refresh = refresh
        self._check = check
        self._reload: anyio.CancelScope | None = None  # cancelled: read the index again now
        self._checks_from = math.inf  # no size check before this time (none while loading)
        self._behind = False
        self.loaded = False
        self.version = 0
        self._changed = anyio.Event()

    @property
    def by_status(self) -> Counter[str]:
        return self._tally.by_status

    @property
    def workflows(self) -> Counter[str]:
        return self._tally.workflows

    @property
    def queues(self) -> Counter[str]:
        return self._tally.queues

    @property
    def total(self) -> int:
        return len(self._tally.runs)

    def apply(self, entry: IndexEntry) -> None:
        if self._tally.apply(entry):
            self.version += 1

    def forget(self, run_ids: list[str]) -> None:
        """Drop runs found deleted (their summary gone from the index)."""
        if sum(self._tally.forget(run_id) for run_id in run_ids):
            self.version += 1
            self.notify()

    def children(self, run_id: str) -> list[str]:
        """Runs started as children of ``run_id`` (as far as the index knows)."""
        return list(self._tally.children.get(run_id, ()))

    def select(
        self, matches: Callable[[Row], bool], offset: int, size: int
    ) -> tuple[list[str], int]:
        """Ids of the matching runs ``offset..offset+size``, most recently changed first,
        and how many match in all."""
        found = [row for row in self._tally.runs.values() if matches(row)]
        found.sort(key=lambda row: (row.updated_at, row.run_id), reverse=True)
        return [row.run_id for row in found[offset : offset + size]], len(found)

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self, version: int) -> int:
        """Wait until the counts move past ``version``; returns the new version."""
        while self.version == version:
            await self._changed.wait()
        return self.version

    async def follow(self, conn: Connection) -> None:
        """Load the index and keep following it, until cancelled."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._check_size, conn)
            await self._keep_following(conn)

    async def _keep_following(self, conn: Connection) -> None:
        while True:
            try:
                with anyio.move_on_after(self._refresh) as self._reload:
                    await self._follow(conn)
            except _FellBehind:
                log.info("console: live index fell behind its updates; reading it again")
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # a restart of the server: read again from the start
                log.warning("console: following the run index failed (%s); retrying", exc)
                await anyio.sleep(_RETRY)

    async def _follow(self, conn: Connection) -> None:
        send, receive = anyio.create_memory_object_stream[bytes](_BUFFER)
        self._behind = False

        async def on_msg(msg: Msg) -> None:
            try:
                send.send_nowait(msg.data)
            except anyio.WouldBlock:
                self._behind = True

        sub = await conn.nc.subscribe(f"{RUNS_PREFIX}.>", cb=on_msg)
        try:
            fresh = _Tally()
            self._checks_from = math.inf
            began = anyio.current_time()
            await _load(conn, fresh)
            took = anyio.current_time() - began
            self._checks_from = anyio.current_time() + _LOAD_SHARE * took
            self._tally, self.loaded = fresh, True
            self.version += 1
            self.notify()
            async for data in receive:
                if self._behind:
                    raise _FellBehind
                self._take(data)
                if receive.statistics().current_buffer_used == 0:
                    self.notify()
        finally:
            with anyio.CancelScope(shield=True):  # ended by a reload: unsubscribe all the same
                await sub.unsubscribe()

    async def _check_size(self, conn: Connection) -> None:
        """Read the index again when it holds fewer summaries than the tally has rows: runs
        were deleted (a summary written meanwhile, not yet applied, only delays this)."""
        while True:
            await anyio.sleep(self._check)
            if anyio.current_time() < self._checks_from or self._reload is None:
                continue
            try:
                size = await stream_size(conn, RUNS_STREAM)
            except NatflowError:  # following the index fails too, and says so
                continue
            if size is not None and size < self.total:
                log.debug("console: %d runs left the index; reading it again", self.total - size)
                self._checks_from = math.inf
                self._reload.cancel()

    def _take(self, data: bytes) -> None:
        try:
            self.apply(_entry_decoder.decode(data))
        except UNDECODABLE:
            log.debug("console: unreadable index entry skipped")


async def _load(conn: Connection, tally: _Tally) -> None:
    """Every entry of the run index into ``tally``, in batches of thousands."""
    bounds = await stream_bounds(conn, RUNS_STREAM)
    if bounds is None:  # no index yet
        return
    start, last = bounds
    while start <= last:
        page = await reader(conn).read(RUNS_STREAM, start=start, batch=BATCH)
        for msg in page.messages:
            try:
                tally.apply(_entry_decoder.decode(msg.data))
            except UNDECODABLE:
                log.debug("console: unreadable index entry skipped")
        if not page.messages or page.pending <= 0:
            break
        start = page.last_seq + 1
