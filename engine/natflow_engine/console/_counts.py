"""Live counts of runs per status (and the workflows and queues seen), for the runs page.

At start the console reads the whole run index once, in large batches, then follows every
summary the engine writes (``natflow.runs.>``) as it is published. Each summary carries the
history sequence it reflects, so an older one arriving late never overwrites a newer one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Final

import anyio
import msgspec
from nats.aio.msg import Msg

from .._connection import Connection
from .._index import IndexEntry
from .._reader import BATCH, reader
from .._streams import RUNS_PREFIX, RUNS_STREAM

log = logging.getLogger("natflow.console")

_entry_decoder = msgspec.json.Decoder(IndexEntry)
_RETRY: Final = 2.0


class Row:
    """What the console keeps in memory of one run: enough to count and filter it."""

    __slots__ = ("created_at", "hseq", "queue", "run_id", "status", "updated_at", "workflow")

    def __init__(self, entry: IndexEntry) -> None:
        info = entry.info
        self.run_id, self.hseq, self.status = info.run_id, entry.hseq, info.status
        self.workflow, self.queue = info.workflow, info.queue
        self.created_at, self.updated_at = info.created_at, info.updated_at


class StatusCounts:
    """Counts of runs per status, kept current, and a small row per run for filtering."""

    def __init__(self) -> None:
        self._runs: dict[str, Row] = {}
        self.by_status: Counter[str] = Counter()
        self.workflows: Counter[str] = Counter()
        self.queues: Counter[str] = Counter()
        self._children: dict[str, list[str]] = {}  # parent run id -> child run ids
        self.loaded = False
        self.version = 0
        self._changed = anyio.Event()

    def apply(self, entry: IndexEntry) -> None:
        info = entry.info
        old = self._runs.get(info.run_id)
        if old is not None:
            if old.hseq >= entry.hseq:
                return
            self.by_status[old.status] -= 1
        else:
            self.workflows[info.workflow] += 1
            self.queues[info.queue] += 1
            if info.parent is not None:
                self._children.setdefault(info.parent, []).append(info.run_id)
        self._runs[info.run_id] = Row(entry)
        self.by_status[info.status] += 1
        self.version += 1

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self, version: int) -> int:
        """Wait until the counts move past ``version``; returns the new version."""
        while self.version == version:
            await self._changed.wait()
        return self.version

    def children(self, run_id: str) -> list[str]:
        """Runs started as children of ``run_id`` (as far as the index knows)."""
        return list(self._children.get(run_id, ()))

    def select(
        self, matches: Callable[[Row], bool], offset: int, size: int
    ) -> tuple[list[str], int]:
        """Ids of the matching runs ``offset..offset+size``, most recently changed first,
        and how many match in all."""
        found = [row for row in self._runs.values() if matches(row)]
        found.sort(key=lambda row: (row.updated_at, row.run_id), reverse=True)
        return [row.run_id for row in found[offset : offset + size]], len(found)

    @property
    def total(self) -> int:
        return len(self._runs)

    async def follow(self, conn: Connection) -> None:
        """Load the index and keep following it, until cancelled."""
        while True:
            try:
                await self._follow(conn)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # a restart of the server: read again from the start
                log.warning("console: following the run index failed (%s); retrying", exc)
                await anyio.sleep(_RETRY)

    async def _follow(self, conn: Connection) -> None:
        send, receive = anyio.create_memory_object_stream[bytes](100_000)

        async def on_msg(msg: Msg) -> None:
            try:
                send.send_nowait(msg.data)
            except anyio.WouldBlock:  # far behind: the next full read catches up
                log.debug("console: index update dropped")

        sub = await conn.nc.subscribe(f"{RUNS_PREFIX}.>", cb=on_msg)
        try:
            await self._load(conn)
            self.loaded = True
            self.notify()
            async for data in receive:
                self._take(data)
                if receive.statistics().current_buffer_used == 0:
                    self.notify()
        finally:
            await sub.unsubscribe()

    def _take(self, data: bytes) -> None:
        try:
            self.apply(_entry_decoder.decode(data))
        except msgspec.DecodeError:
            log.debug("console: unreadable index entry skipped")

    async def _load(self, conn: Connection) -> None:
        try:
            info = await conn.jsm.stream_info(RUNS_STREAM)
        except Exception:  # no index yet
            return
        start, last = info.state.first_seq, info.state.last_seq
        while start <= last:
            page = await reader(conn).read(RUNS_STREAM, start=start, batch=BATCH)
            for msg in page.messages:
                self._take(msg.data)
            if not page.messages or page.pending <= 0:
                break
            start = page.last_seq + 1
