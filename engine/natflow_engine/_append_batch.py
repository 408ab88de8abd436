"""Appends of many runs to one stream grouped into atomic batches, one acknowledgement
each: run histories, the engine's lifecycle events, and its run-index writes where the
index is replicated (on a single server it is acknowledged before its fsync, which excludes
atomic batches: see ``_streams._acknowledged_before_fsync``).

An atomic batch is stored, fsynced and acknowledged once (NATS.md §6, §12). Measured on the
2-core VM, 200 runs appending 5 conditional messages each: one request per message
1,570-1,712 messages/s, 113-120 us of client and 180-210 us of server CPU each; grouped:
6,729-8,709 messages/s, 41-46 us and 50-60 us.

Two groupings, each with no timer:

* ``TurnBatcher``, for run histories: by turn of the event loop, with no wait for an
  acknowledgement. The first append in a turn goes out at once, alone. Appends made after it
  in the same turn queue, and go out together as one batch at the loop's next turn, while
  the first is still in flight. So a lone append waits for nothing, a queued one for at most
  one turn, and appends group only where many runs write at once. Batches are pipelined;
  past ``MAX_IN_FLIGHT`` unacknowledged ones, appends go alone. (Grouping behind the send in
  flight, as below, made a worker under full CPU let sleeping runs go 20-60 ms late.)
* ``QueueBatcher``, for the engine's lifecycle events (and run index): an append that finds
  fewer than ``MAX_SENDING`` sends in flight goes alone at once; appends made while that
  many are in flight queue, and the next one out takes them all as one batch (fewer than
  ``MIN_BATCH`` go alone, pipelined, as below). An engine works on many runs at once, so
  waiting for the send ahead bounds nothing, and its batches grow larger than a turn's: by
  turn, its CPU on the 2-core VM was that of no batching.

Where: history appends only where batches pay (``pays``). nats-server stages every atomic
batch of a one-replica file stream in a temporary file store; with a fsync before every ack
(the shipped configuration) the fsyncs saved pay for it, on a relaxed server the many small
batches of many workers and clients do not (runs were 16-37 % slower on 16 cores). A client
cannot ask the server its sync mode, so the engine records it on the history stream
(``record_sync_mode``) and each process reads it when it connects (``ensure_streams``). The
engine's writes batch in every mode: turning them off on a relaxed server cost 6-11 % on 16
cores.

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
# Batches sent and not yet acknowledged, per connection and stream: the server takes 50 in
# flight per stream from all its clients, and refuses a batch past that (its appends then go
# alone, after a wasted round trip).
MAX_IN_FLIGHT: Final = 8
# QueueBatcher: appends alone in flight before the next ones queue for a batch; two keep the
# pipe full while one batch is stored.
MAX_SENDING: Final = 2
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


class _Batcher:
    """What both groupings share: whether to batch at all, and sending one atomic batch."""

    def __init__(self, conn: Connection, stream: str) -> None:
        self._conn = conn
        self._stream = stream  # for the metrics only: the server knows where each goes
        APPEND_BATCHES.labels(stream)  # exported at zero from the start
        APPENDS_BATCHED.labels(stream)
        self._queue: list[_Append] = []
        self.enabled = True  # False once the stream refused a batch (no ``allow_atomic``)
        self.pays = True  # False where the server's sync mode makes batches cost more
        self._prefix = os.urandom(6).hex()
        self._ids = count(1)
        self.batches = 0  # committed batches, and the appends they carried
        self.batched = 0

    def _alone(self, headers: Mapping[str, str]) -> bool:
        """Whether this append goes alone whatever else is being written."""
        return not (self.enabled and self.pays) or "Nats-Rollup" in headers

    @staticmethod
    def _too_few(batch: list[_Append], sender: _Append) -> bool:
        """Whether ``batch`` is too small to pay back a batch's staging (``MIN_BATCH``); if
        so, each of its appends but ``sender`` (its caller's own) goes alone, at once."""
        if len(batch) >= MIN_BATCH:
            return False
        for item in batch:
            if item is not sender:
                item.outcome.set_result(None)
        return True

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
        raise NotImplementedError

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
        for at, item in enumerate(batch, 1):
            headers = {**item.headers, "Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(at)}
            if at < last:
                await self._conn.nc.publish(item.subject, item.data, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            try:
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


class TurnBatcher(_Batcher):
    """Groups the appends made in one turn of the event loop (run histories: a queued
    append waits one turn, never for an acknowledgement)."""

    def __init__(self, conn: Connection, stream: str) -> None:
        super().__init__(conn, stream)
        self._alone_this_turn = False  # an append went out alone since the loop last turned
        self._turn_given = False  # a queued append holds the turn to send the queue
        self._in_flight = 0  # batches sent, not yet acknowledged

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """As ``Connection.publish``, grouped with the appends made in the same turn."""
        if self._alone(headers) or self._in_flight >= MAX_IN_FLIGHT:
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        if not self._alone_this_turn:
            self._alone_this_turn = True
            asyncio.get_running_loop().call_soon(self._turned)
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        item = _Append(subject, data, headers)
        self._queue.append(item)
        if not self._turn_given:  # the first to queue in this turn sends what queues with it
            self._turn_given = True
            item.outcome.set_result(_TURN)
        while (seq := await self._wait(item)) == _TURN:
            item.outcome = asyncio.get_running_loop().create_future()
            if await self._send(item, timeout):
                return await self._conn.publish(subject, data, headers, timeout=timeout)
        if seq is None:
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        return PubAck(stream="", seq=seq, duplicate=False)

    def next_alone(self) -> bool:
        """Whether an append made now goes out alone, handed to the connection before its
        caller first waits, rather than joining this turn's batch (the first of each turn
        does: an idle writer's every append)."""
        alone = not (self.enabled and self.pays) or self._in_flight >= MAX_IN_FLIGHT
        return alone or not self._alone_this_turn

    def _turned(self) -> None:
        """The loop turned: the next append may go alone again."""
        self._alone_this_turn = False

    def _hand_on(self) -> None:
        """Give the turn to the queue's first live append, if any (one holder at a time)."""
        self._turn_given = False
        while self._queue and self._queue[0].outcome.done():  # cancelled while queued
            self._queue.pop(0)
        if self._queue:
            self._turn_given = True
            self._queue[0].outcome.set_result(_TURN)

    async def _send(self, sender: _Append, timeout: float) -> bool:
        """Send the queue as one batch, once this turn's appends are in it, and settle each
        of its appends; True if it held ``sender`` alone (for its caller to publish)."""
        try:
            await asyncio.sleep(0)  # the appends made after this one in this turn join it
        except asyncio.CancelledError:
            self._pass_turn_on(sender)
            raise
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch = [i for i in batch if i is sender or not i.outcome.done()]
        self._hand_on()  # past MAX_BATCH: the rest go next, without waiting for this batch
        if self._too_few(batch, sender):
            return True
        self._in_flight += 1
        try:
            await self._batch(batch, timeout)
        finally:
            self._in_flight -= 1
        return False

    def _pass_turn_on(self, holder: _Append) -> None:
        if holder in self._queue:
            self._queue.remove(holder)
        self._hand_on()


class QueueBatcher(_Batcher):
    """Groups the appends made while ``MAX_SENDING`` sends are in flight (the engine's run
    index and lifecycle events: few writers, each working on many runs at once, so a queued
    append's wait for the send ahead of it bounds nothing, and batches grow large)."""

    def __init__(self, conn: Connection, stream: str) -> None:
        super().__init__(conn, stream)
        self._sending = 0  # appends or batches in flight (at most MAX_SENDING)

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """As ``Connection.publish``, grouped with the appends made meanwhile."""
        if self._alone(headers):
            return await self._conn.publish(subject, data, headers, timeout=timeout)
        if self._sending < MAX_SENDING:
            self._sending += 1
            try:
                return await self._conn.publish(subject, data, headers, timeout=timeout)
            finally:
                self._release()
        item = _Append(subject, data, headers)
        self._queue.append(item)
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

    def _pass_turn_on(self, holder: _Append) -> None:
        if holder in self._queue:
            self._queue.remove(holder)
        self._release()

    def _release(self) -> None:
        """A send is over: hand the queue to its first live append."""
        self._sending -= 1
        self._queue = [i for i in self._queue if not i.outcome.cancelled()]
        # One turn at a time: its holder takes the whole head of the queue.
        if self._queue and self._sending < MAX_SENDING and not self._queue[0].outcome.done():
            self._sending += 1
            self._queue[0].outcome.set_result(_TURN)

    async def _send(self, sender: _Append, timeout: float) -> bool:
        """Send the queue's head as one batch and settle each of its appends; True if the
        head was ``sender`` alone (taken off the queue, for its caller to publish)."""
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch = [i for i in batch if not i.outcome.cancelled()]
        if self._too_few(batch, sender):
            return True
        await self._batch(batch, timeout)
        return False


Batcher = TurnBatcher | QueueBatcher


def appender(conn: Connection, stream: str, *, by_turn: bool = False) -> Batcher:
    """The connection's batcher for ``stream`` (a batch goes to one stream only): grouping
    by turn of the loop (``TurnBatcher``) or behind the sends in flight (``QueueBatcher``),
    always the same for one stream."""
    kind = TurnBatcher if by_turn else QueueBatcher
    key = f"appender:{stream}"
    existing = conn.extras.get(key)
    if existing is not None:
        if not isinstance(existing, kind):
            made_as = type(existing).__name__
            raise TypeError(f"{stream} is batched by {made_as}, not {kind.__name__}")
        return existing
    made = kind(conn, stream)
    conn.extras[key] = made
    return made
