"""Writes of many runs to one stream grouped into atomic batches, one acknowledgement each:
the engine's run-index writes and lifecycle events.

An atomic batch is stored, fsynced and acknowledged once (NATS.md §6, §12). Measured on the
2-core VM, 200 runs appending 5 conditional messages each: one request per message
1,570-1,712 messages/s, 113-120 us of client and 180-210 us of server CPU each; grouped:
6,729-8,709 messages/s, 41-46 us and 50-60 us.

How they group: no timer. A write that finds fewer than ``MAX_SENDING`` sends in flight goes
out at once (alone, as a plain publish); writes made while that many are in flight queue,
and the next one out takes them all as one batch. A lone write therefore waits for nothing,
and writes group only where many runs write at once. What a queued write waits for is the
send ahead of it: worth it for the engine, whose dispatcher works on many runs at once. Run
histories are not batched: on the 16-core machine it doubled the durable runs/s, but a
worker under full CPU let a sleeping run go ~20-60 ms later than the 0.5 s the timers test
allows (``tests/test_timers.py``). A pipelined grouping (by turn of the event loop) kept that
test green but made relaxed runs slower: nats-server stages each atomic batch of a
one-replica file stream in a temporary file store, which only fsyncs saved pay for, and a
client cannot read the server's sync mode (README, "Scale-out").

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

log = logging.getLogger("natflow.batches")

MAX_BATCH: Final = 256  # the server takes up to 1,000 messages in one batch
# Sends in flight per connection and stream: two keep the pipe full while one batch is
# stored (the server takes 50 batches in flight per stream; past that a batch is refused and
# its appends go alone).
MAX_SENDING: Final = 2
ERR_BATCH_DISABLED: Final = 10174  # the stream does not allow atomic batches
_TURN: Final = -1  # a queued append's signal: flush what is queued, this one among it


class _Append:
    __slots__ = ("data", "headers", "outcome", "subject")

    def __init__(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        self.subject, self.data, self.headers = subject, data, headers
        # the stream sequence it landed at, None to make it alone, or _TURN
        self.outcome: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()


class AppendBatcher:
    """Groups a connection's concurrent conditional appends to one stream into atomic
    batches."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: list[_Append] = []
        self._sending = 0  # appends or batches in flight (at most MAX_SENDING)
        self.enabled = True
        self._prefix = os.urandom(6).hex()
        self._ids = count(1)
        self.batches = 0  # committed batches, and the appends they carried
        self.batched = 0

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """As ``Connection.publish``, grouped with the appends made meanwhile."""
        if not self.enabled or "Nats-Rollup" in headers:
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

    async def _wait(self, item: _Append) -> int | None:
        try:
            return await item.outcome
        except asyncio.CancelledError:
            # Handed the turn, then cancelled before taking it: pass it on, or the queue
            # would wait for a sender that never comes.
            turn = item.outcome.done() and not item.outcome.cancelled()
            if turn and item.outcome.result() == _TURN:
                if item in self._queue:
                    self._queue.remove(item)
                self._release()
            raise

    def _release(self) -> None:
        """A send is over: hand the queue to its first live append."""
        self._sending -= 1
        self._hand_on()

    def _hand_on(self) -> None:
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
        if batch == [sender]:
            return True
        seqs: list[int] | None = None
        try:
            seqs = await self._atomic(batch, timeout)
        finally:
            for at, item in enumerate(batch):
                if not item.outcome.done():
                    item.outcome.set_result(seqs[at] if seqs is not None else None)
        return False

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
        first = ack.seq - last + 1  # a committed batch is stored in one piece, in order
        return [first + at for at in range(last)]


def appender(conn: Connection, stream: str) -> AppendBatcher:
    """The connection's batcher for ``stream`` (a batch goes to one stream only)."""
    key = f"appender:{stream}"
    existing = conn.extras.get(key)
    if isinstance(existing, AppendBatcher):
        return existing
    made = AppendBatcher(conn)
    conn.extras[key] = made
    return made
