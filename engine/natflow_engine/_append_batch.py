"""Appends of many runs to one stream grouped into atomic batches, one acknowledgement
each: run histories, the engine's lifecycle events, and its run-index writes where the
index is replicated (on a single server it is acknowledged before its fsync, which excludes
atomic batches: see ``_streams._acknowledged_before_fsync``).

An atomic batch is stored, fsynced and acknowledged once (NATS.md §6, §12). Measured on the
2-core VM, 200 runs appending 5 conditional messages each: one request per message
1,570-1,712 messages/s, 113-120 us of client and 180-210 us of server CPU each; grouped:
6,729-8,709 messages/s, 41-46 us and 50-60 us.

One grouping, with no timer: behind the sends in flight. An append that finds fewer than
``sending`` sends (alone or batched) in flight goes out alone at once, so an idle writer's
appends wait for nothing. Appends made while that many are in flight queue, and the first of
them takes the whole queue out as one batch when a send is done (fewer than ``MIN_BATCH``
go alone, pipelined: a small batch does not pay back its staging). A queued append so waits
for at most the send ahead of it, and a busy writer's batches hold everything its runs
appended meanwhile.

How many sends in flight: one for run histories (``HISTORY_SENDING``), two for the engine's
writes (``MAX_SENDING``). nats-server stores a stream's atomic batches one after another
(each staged in a temporary file store of its own on a one-replica file stream: ~3 ms for a
batch of 30 on the 2-core VM, idle, against ~0.4 ms for one write), so a writer that keeps
more batches in flight gains no speed from the server and splits its appends into more,
smaller batches and more lone writes, each with a fsync. History appends grouped by turn of
the event loop with up to eight batches in flight (the earlier grouping) made 191 batches
and ~1,175 lone writes for a worker's 8,200 appends (one worker, 2,000 runs x 3 at once);
behind one send, 159-173 and 37-68 (three runs). ``natflow bench --scale 2``, eight
alternating pairs: 1,040 -> 1,261 runs/s and 1.61 -> 1.41 ms of CPU per run, all processes;
two sends in flight gained half as much. A whole batch (``MAX_BATCH``) waiting goes at once
beside the sends in flight, so a burst of thousands of starts is not held to one batch at a
time. The engine keeps two: it writes from many lanes at once, and one send in flight made
its lifecycle batches no larger (159 -> 173 batches).

Where: history appends only where batches pay (``pays``). nats-server stages every atomic
batch of a one-replica file stream in a temporary file store; with a fsync before every ack
(the shipped configuration) the fsyncs saved pay for it, on a relaxed server the many small
batches of many workers and clients do not (runs were 16-37 % slower on 16 cores). A client
cannot ask the server its sync mode, so the engine records it on the history stream
(``record_sync_mode``) and each process reads it when it connects (``ensure_streams``). The
engine's writes batch in every mode: turning them off on a relaxed server cost 6-11 % on 16
cores. Those figures are from staging on disk. The embedded server stages in tmpfs
(``_batch_staging``), where batching relaxed history too measured +8 % on 2 cores (Python
parses one acknowledgement a batch), but a batch still costs the server 440-625 us against
10-20 us for an append alone (stop 30), and the server is what bounds 16 cores: relaxed
history stays unbatched.

Each message of a batch keeps its own expected last sequence and message id, so fencing and
deduplication are what they are alone. The batch is all or nothing: if any expectation fails
(a run moved on), a message id repeats, the batch cannot be committed or its acknowledgement
is lost, each of its writes is made again alone, through the caller's ordinary path. A
stream without ``allow_atomic`` (an older natflow's, not yet updated) turns batching off for
the connection and that stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from itertools import count
from typing import Final

from ._connection import Connection, JetStreamError, PubAck
from ._errors import NatflowError
from ._metrics import APPEND_BATCHES, APPENDS_BATCHED, labelled

log = logging.getLogger("natflow.batches")

MAX_BATCH: Final = 256  # the server takes up to 1,000 messages in one batch
# Sends in flight before the next appends queue for a batch: the engine's writes (two keep
# its pipe full while one batch is stored), and run histories (one: see the module's
# docstring).
MAX_SENDING: Final = 2
HISTORY_SENDING: Final = 1
# Fewer appends than this go alone, pipelined: a batch on a one-replica file stream is staged
# in a temporary file store of its own (nats-server's newBatchStore), which a few appends do
# not pay back. For the engine's queue too: 3,000 x 3 on 2 cores, 6 alternating pairs,
# 211 -> 224 runs/s and 7.67 -> 7.31 ms of CPU per run against batching any queue of two.
MIN_BATCH: Final = 8
ERR_BATCH_DISABLED: Final = 10174  # the stream does not allow atomic batches
SYNC_ALWAYS: Final = "always"  # the server fsyncs every write before its ack
SYNC_INTERVAL: Final = "interval"  # it acks from the page cache and fsyncs every so often
_TURN: Final = -1  # a queued append's signal: send what is queued, this one among it


class _Append:
    __slots__ = ("data", "headers", "outcome", "subject")

    def __init__(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        self.subject, self.data, self.headers = subject, data, headers
        # the stream sequence it landed at, None to make it alone, or _TURN
        self.outcome: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()


class Batcher:
    """Groups the appends to one stream made while ``sending`` sends are in flight into
    atomic batches (see the module's docstring)."""

    def __init__(self, conn: Connection, stream: str, *, sending: int = MAX_SENDING) -> None:
        self._conn = conn
        self._stream = stream  # for the metrics only: the server knows where each goes
        self.sending = sending  # sends in flight before appends queue
        APPEND_BATCHES.labels(stream)  # exported at zero from the start
        APPENDS_BATCHED.labels(stream)
        self._queue: list[_Append] = []
        self._in_flight = 0  # sends in flight, alone or batched (at most ``sending``)
        self.enabled = True  # False once the stream refused a batch (no ``allow_atomic``)
        self.pays = True  # False where the server's sync mode makes batches cost more
        self._prefix = os.urandom(6).hex()
        self._ids = count(1)
        self.batches = 0  # committed batches, and the appends they carried
        self.batched = 0

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """As ``Connection.publish``, grouped with the appends made meanwhile."""
        if self._alone(headers):
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        if self._in_flight < self.sending:
            self._in_flight += 1
            try:
                return await self._conn.publish(subject, data, headers, timeout=timeout)
            finally:
                self._release()
        item = _Append(subject, data, headers)
        self._queue.append(item)
        if len(self._queue) >= MAX_BATCH:
            # A whole batch waits: it goes now, beside the sends in flight, so a burst (a
            # client starting thousands of runs) is not held to one batch at a time.
            self._give_turn()
        while (seq := await self._wait(item)) == _TURN:
            # This caller sends the queue, its own append among it.
            item.outcome = asyncio.get_running_loop().create_future()
            try:
                if await self._send(item, timeout):
                    return await self._conn.publish(subject, data, headers, timeout=timeout)
            finally:
                self._release()
        if seq is None:
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        return PubAck(stream="", seq=seq, duplicate=False)

    def next_alone(self) -> bool:
        """Whether an append made now (one that is not a rollup) is handed to the connection
        before its caller first waits, rather than queued for a batch: an idle writer's
        every append is."""
        return self._alone({}) or self._in_flight < self.sending

    def _alone(self, headers: Mapping[str, str]) -> bool:
        """Whether this append goes alone whatever else is being written."""
        return not (self.enabled and self.pays) or "Nats-Rollup" in headers

    async def _wait(self, item: _Append) -> int | None:
        """What became of a queued append: its sequence, None (make it alone) or _TURN."""
        try:
            return await item.outcome
        except asyncio.CancelledError:
            # Handed the turn, then cancelled before taking it: pass it on, or the queue
            # would wait for a sender that never comes.
            turn = item.outcome.done() and not item.outcome.cancelled()
            if turn and item.outcome.result() == _TURN:
                self._pass_turn_on(item)
            raise

    def _pass_turn_on(self, holder: _Append) -> None:
        """``holder`` was cancelled holding the turn: the queue's next live append takes it."""
        if holder in self._queue:
            self._queue.remove(holder)
        self._release()

    def _release(self) -> None:
        """A send is over: hand the queue to its first live append."""
        self._in_flight -= 1
        self._queue = [i for i in self._queue if not i.outcome.cancelled()]
        if self._queue and self._in_flight < self.sending:
            self._give_turn()

    def _give_turn(self) -> None:
        """Let the queue's first append send the queue's head as one batch, unless it holds
        the turn already (one holder at a time); its send counts as in flight."""
        if not self._queue[0].outcome.done():
            self._in_flight += 1
            self._queue[0].outcome.set_result(_TURN)

    async def _send(self, sender: _Append, timeout: float) -> bool:
        """Send the queue's head as one batch and settle each of its appends; True if it
        is too small to batch (its other appends go alone at once, and ``sender``, taken
        off the queue, is left to its caller to publish)."""
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch = [i for i in batch if not i.outcome.cancelled()]
        if len(batch) < MIN_BATCH:
            for item in batch:
                if item is not sender:
                    item.outcome.set_result(None)
            return True
        await self._batch(batch, timeout)
        return False

    async def _batch(self, batch: list[_Append], timeout: float) -> None:
        """Send ``batch`` as one, and tell each of its appends where it landed (or None:
        make it alone)."""
        seqs: list[int] | None = None
        try:
            seqs = await self._atomic(batch, timeout)
        finally:
            for at, item in enumerate(batch):
                if not item.outcome.done():
                    item.outcome.set_result(seqs[at] if seqs is not None else None)

    async def _atomic(self, batch: list[_Append], timeout: float) -> list[int] | None:
        """Publish ``batch`` as one atomic batch; the sequence of each, or None if it was
        not committed (its appends are then made alone)."""
        batch_id = f"{self._prefix}{next(self._ids):x}"
        last = len(batch)
        try:
            for at, item in enumerate(batch, 1):
                headers = {
                    **item.headers,
                    "Nats-Batch-Id": batch_id,
                    "Nats-Batch-Sequence": str(at),
                }
                if at < last:
                    await self._conn.send(item.subject, item.data, headers)
                    continue
                headers["Nats-Batch-Commit"] = "1"
                ack = await self._conn.publish(item.subject, item.data, headers, timeout=timeout)
        except JetStreamError as exc:
            if exc.err_code == ERR_BATCH_DISABLED:
                self.enabled = False
                log.info("stream takes no atomic batches (allow_atomic): writes go one by one")
            else:  # a run moved on, a repeated message id, ...: each alone tells which
                log.debug("batch of %d writes refused (%s); each alone", last, exc)
            return None
        except (NatflowError, TimeoutError) as exc:  # lost: each alone tells if it landed
            log.debug("batch of %d writes not acknowledged (%s); each alone", last, exc)
            return None
        if ack.count != last or ack.seq < last:
            return None
        self.batches += 1
        self.batched += last
        labelled(APPEND_BATCHES, self._stream).inc()
        labelled(APPENDS_BATCHED, self._stream).inc(last)
        first = ack.seq - last + 1  # a committed batch is stored in one piece, in order
        return [first + at for at in range(last)]


def appender(conn: Connection, stream: str, *, sending: int = MAX_SENDING) -> Batcher:
    """The connection's batcher for ``stream`` (a batch goes to one stream only), grouping
    behind ``sending`` sends in flight: always asked for with the same ``sending``."""
    key = f"appender:{stream}"
    existing = conn.extras.get(key)
    if existing is not None:
        assert isinstance(existing, Batcher)
        if existing.sending != sending:
            raise TypeError(f"{stream} is batched behind {existing.sending} sends, not {sending}")
        return existing
    made = Batcher(conn, stream, sending=sending)
    conn.extras[key] = made
    return made
