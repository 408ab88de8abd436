"""What the run index may lose, and its repair: a checkpoint of how far it is on disk.

On a single server the run index (``NATFLOW_RUNS``) is acknowledged before it is fsynced
(JetStream's ``persist_mode: async``): it is a projection of history, and its fsyncs were
about a fifth of the server's CPU per run. nats-server fsyncs such a stream in the
background, at least every two minutes (its default ``sync_interval``, which
``sync_interval: always`` leaves in place for these streams). So an OS crash or a power cut
may lose the summaries written in the last two minutes before it, while the dispatcher's
consumer, which is fsynced, has moved past the events they came from.

The guard keeps that loss repairable:

* Every ``SAMPLE_EVERY`` seconds it notes the dispatcher's acknowledgement floor: every
  event at or below it has had its summary acknowledged. A floor noted ``DURABLE_AFTER``
  seconds ago is on disk, and becomes the checkpoint, with the identity of the server it
  was noted on. The checkpoint is kept in the index stream's own metadata
  (``natflow.index.checkpoint``, JSON; nats-server fsyncs a stream's configuration), at most
  every ``WRITE_EVERY`` seconds: it lives and dies with the index.
* A summary can only be lost with the server: after a restart the server has a new identity
  (nats-server draws one at each start). An engine that finds itself on a server other
  than the checkpoint's, at its start or on a reconnection, forgets the summaries it
  remembers and rewrites from history each one older than its run's history among the runs
  with run-level events above the checkpoint's floor (``RunIndex.restore``). Only then does
  the checkpoint name the new server: an engine that dies half way leaves the repair to the
  next one.

A restart of the server process alone loses nothing (the OS keeps what was written), so
the repair then finds every summary current and writes nothing. With no checkpoint at all (a
new index: a first start, or an index stream removed to be created anew) the floor is 0:
the whole index is rebuilt from history, once. Where the index fsyncs every write (a
cluster's replicated index, or one an older natflow created), the guard does nothing. Runs
are checked in batches: one multi-last read of up to 256 summaries, then a history read and
a write for each one behind.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Final

import anyio
import msgspec
import nats.errors
from nats.js import api

from ._connection import Connection
from ._error_groups import one_error
from ._errors import NatflowError
from ._index import RunIndex
from ._reader import LAST_PER_REQUEST, reader
from ._streams import (
    HISTORY_STREAM,
    RUN_LEVEL_FILTER,
    RUNS_STREAM,
    START_FILTER,
    run_id_of,
    runs_subject,
)
from ._undecodable import UNDECODABLE
from .events import utcnow

log = logging.getLogger("natflow.index_guard")

CHECKPOINT_KEY: Final = "natflow.index.checkpoint"  # in the index stream's metadata
SAMPLE_EVERY: Final = 10.0
# A checkpoint is a stream update (a configuration write and an advisory): twice a minute
# at most. The repair then starts up to this much earlier.
WRITE_EVERY: Final = 30.0
# nats-server fsyncs an async-persisted stream at least every 2 minutes (its default
# sync_interval); half a minute more for a sync that runs late.
DURABLE_AFTER: Final = 150.0
_READ_PAGE: Final = 4096  # history messages per read while looking for the runs to repair
_RESTORING: Final = 16  # runs rewritten at once


class IndexCheckpoint(msgspec.Struct, kw_only=True):
    """Every run-level event at or below ``floor`` (history stream sequence) has its summary
    on disk, as of the server ``server`` (its INFO ``server_id``)."""

    v: int = 1
    floor: int
    server: str
    at: datetime


class _Reflects(msgspec.Struct):
    """Of a summary, only the history sequence it reflects (see ``IndexEntry``)."""

    hseq: int


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(IndexCheckpoint)
_reflects_decoder = msgspec.json.Decoder(_Reflects)


async def _index_config(conn: Connection) -> api.StreamConfig:
    info = await conn.admin(f"stream {RUNS_STREAM}", lambda: conn.jsm.stream_info(RUNS_STREAM))
    return info.config


def _checkpoint_of(config: api.StreamConfig) -> IndexCheckpoint | None:
    found = (config.metadata or {}).get(CHECKPOINT_KEY)
    if found is None:
        return None
    try:
        return _decoder.decode(found)
    except UNDECODABLE:
        log.warning("stream %s: %s is not a checkpoint; ignored", RUNS_STREAM, CHECKPOINT_KEY)
        return None


async def read_checkpoint(conn: Connection) -> IndexCheckpoint | None:
    return _checkpoint_of(await _index_config(conn))


async def write_checkpoint(conn: Connection, floor: int, server: str) -> None:
    config = await _index_config(conn)
    point = IndexCheckpoint(floor=floor, server=server, at=utcnow())
    config.metadata = {**(config.metadata or {}), CHECKPOINT_KEY: _encoder.encode(point).decode()}
    await conn.admin(
        "recording the run index's checkpoint",
        lambda: conn.jsm.update_stream(config),
        subject=f"{conn.api}.STREAM.UPDATE.{RUNS_STREAM}",
    )


def index_unsynced(config: api.StreamConfig) -> bool:
    """Whether the server acknowledges index writes before fsyncing them."""
    return config.persist_mode == api.PersistMode.ASYNC


async def runs_above(conn: Connection, floor: int) -> AsyncIterator[dict[str, int]]:
    """The runs with run-level events (starts included) above ``floor``, a page of history
    at a time: each run with the sequence of its last event in that page. A run may come in
    more than one page."""
    read = reader(conn)
    for subject in (START_FILTER, RUN_LEVEL_FILTER):
        start = floor + 1
        while True:
            page = await read.read(
                HISTORY_STREAM, subject, start=start, batch=_READ_PAGE, headers=True
            )
            runs: dict[str, int] = {}
            for msg in page.messages:
                headers = msg.headers or {}
                run_id = run_id_of(headers.get("Nats-Subject", msg.subject))
                runs[run_id] = max(runs.get(run_id, 0), int(headers.get("Nats-Sequence", "0")))
            if runs:
                yield runs
            if not page.messages or len(page.messages) >= page.pending:
                break
            start = page.last_seq + 1


async def behind(conn: Connection, runs: dict[str, int]) -> list[str]:
    """Those of ``runs`` whose summary is missing or older than their last event."""
    late: list[str] = []
    ids = list(runs)
    read = reader(conn)
    for at in range(0, len(ids), LAST_PER_REQUEST):
        chunk = ids[at : at + LAST_PER_REQUEST]
        page = await read.read_last(RUNS_STREAM, [runs_subject(r) for r in chunk])
        held: dict[str, int] = {}
        for msg in page.messages:
            subject = (msg.headers or {}).get("Nats-Subject", msg.subject)
            try:
                held[subject.rsplit(".", 1)[1]] = _reflects_decoder.decode(msg.data).hseq
            except UNDECODABLE:
                continue  # not a summary: rewritten like a missing one
        late += [r for r in chunk if held.get(r, 0) < runs[r]]
    return late


async def repair(conn: Connection, index: RunIndex, floor: int) -> int:
    """Rewrite from history each summary older than its run's history, among the runs with
    run-level events above ``floor``; how many were rewritten. Page by page, so a whole
    history (a new index) is gone through in bounded memory."""
    index.forget()
    rewritten = 0
    limiter = anyio.CapacityLimiter(_RESTORING)

    async def restore(run_id: str) -> None:
        nonlocal rewritten
        async with limiter:
            if await index.restore(run_id):
                rewritten += 1

    async for runs in runs_above(conn, floor):
        late = await behind(conn, runs)
        # A restore cut off by a lost server stops the repair as a natflow error, which the
        # guard's loop retries, not as a group that ended the engine.
        with one_error():
            async with anyio.create_task_group() as tg:
                for run_id in late:
                    tg.start_soon(restore, run_id)
    return rewritten


class IndexGuard:
    """Keeps the checkpoint, and repairs the index after the server restarted."""

    def __init__(
        self,
        conn: Connection,
        index: RunIndex,
        ack_floor: Callable[[], Awaitable[int]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conn = conn
        self._index = index
        self._ack_floor = ack_floor  # the dispatcher's acknowledgement floor, read now
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()  # (when, floor), oldest first
        self._floor = 0  # the checkpoint's floor as last written or read
        self._durable = 0  # the newest floor on disk, written or not yet
        self._written = -WRITE_EVERY  # when (clock) the checkpoint was last written
        self._server: str | None = None  # the server the checkpoint names
        self.checks = 0  # rounds done, repairs run, and summaries they rewrote
        self.repairs = 0
        self.rewritten = 0

    async def run(self) -> None:
        try:
            config = await _index_config(self._conn)
        except (NatflowError, nats.errors.Error) as exc:
            log.warning("cannot read stream %s (%s): no index checkpoint kept", RUNS_STREAM, exc)
            return
        if not index_unsynced(config):
            log.info("run index fsynced on every write: no checkpoint kept")
            return
        while True:
            try:
                await self.check()
            except (NatflowError, nats.errors.Error, TimeoutError) as exc:
                # The server is away or refuses: a repair not finished runs again next time.
                log.warning("run index checkpoint not kept this time: %s", exc)
            await anyio.sleep(SAMPLE_EVERY)

    async def check(self) -> None:
        """One round: repair if the server changed, then note the floor and checkpoint."""
        server = self._conn.server_id
        if self._server is None:
            stored = await read_checkpoint(self._conn)
            # None: nothing is known to be on disk. A new index (a first start, or one
            # removed to be created anew) is then rebuilt from the whole history.
            self._floor, self._server = (0, "") if stored is None else (stored.floor, stored.server)
        if server != self._server:
            await self._repair(server)
        else:
            await self._note_floor(server)
        self.checks += 1

    async def _note_floor(self, server: str) -> None:
        now = self._clock()
        self._samples.append((now, await self._ack_floor()))
        durable = None
        while self._samples and now - self._samples[0][0] >= DURABLE_AFTER:
            durable = self._samples.popleft()[1]
        if durable is not None and durable > self._durable:
            self._durable = durable
        if self._durable > self._floor and now - self._written >= WRITE_EVERY:
            await write_checkpoint(self._conn, self._durable, server)
            self._floor, self._written = self._durable, now

    async def _repair(self, server: str) -> None:
        # Floors noted before the restart may not be on disk: start over after the repair.
        self._samples.clear()
        self._durable = self._floor
        began = time.monotonic()
        log.info(
            "%s: checking the runs with events above history sequence %d",
            "the server restarted since the run index's checkpoint"
            if self._server
            else "the run index has no checkpoint yet",
            self._floor,
        )
        rewritten = await repair(self._conn, self._index, self._floor)
        await write_checkpoint(self._conn, self._floor, server)
        self._written = self._clock()
        self._server = server
        self.repairs += 1
        self.rewritten += rewritten
        # A restart of the server process alone loses nothing; a power cut may.
        log.log(
            logging.WARNING if rewritten else logging.INFO,
            "run index checked in %.1f s: %d missing or older summaries rewritten from history",
            time.monotonic() - began,
            rewritten,
        )
