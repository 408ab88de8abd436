"""Appends of many runs to one stream grouped into atomic batches, one acknowledgement
each: run histories, the engine's run-index writes and lifecycle events.

An atomic batch is stored, fsynced and acknowledged once (NATS.md §6, §12). Measured on the
2-core VM, 200 runs appending 5 conditional messages each: one request per message
1,570-1,712 messages/s, 113-120 us of client and 180-210 us of server CPU each; grouped:
6,729-8,709 messages/s, 41-46 us and 50-60 us.

How they group: by turn of the event loop, with no timer and no wait for an acknowledgement.
The first append in a turn of the loop goes out at once, alone, as a plain publish. Appends
made after it in the same turn queue, and go out together as one batch at the loop's next
turn, while the first is still in flight. So a lone append waits for nothing, a queued one
for at most one turn of the loop, and appends group only where many runs write at once (a
busy process, whose turns hold many runs' work). Batches are pipelined: a batch does not wait
for the one before it. (A first version let a queued append wait for the send ahead of it:
a worker under full CPU then let sleeping runs go 20-60 ms late.) Past ``MAX_IN_FLIGHT``
unacknowledged batches, appends go alone.

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
# Batches sent and not yet acknowledged, per connection and stream: the server takes 50 in
# flight per stream from all its clients, and refuses a batch past that (its appends then go
# alone, after a wasted round trip).
MAX_IN_FLIGHT: Final = 8
# Fewer appends than this go alone, pipelined: a batch on a one-replica file stream is staged
# in a temporary file store of its own (nats-server's newBatchStore), which a few appends do
# not pay back.
MIN_BATCH: Final = 8
ERR_BATCH_DISABLED: Final = 10174  # the stream does not allow atomic batches
_TURN: Final = -1  # a queued append's signal: send what is queued, this one among it


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
        self._alone_this_turn = False  # an append went out alone since the loop last turned
        self._turn_given = False  # a queued append holds the turn to send the queue
        self._in_flight = 0  # batches sent, not yet acknowledged
        self.enabled = True
        self._prefix = os.urandom(6).hex()
        self._ids = count(1)
        self.batches = 0  # committed batches, and the appends they carried
        self.batched = 0

    async def publish(
        self, subject: str, data: bytes, headers: Mapping[str, str], *, timeout: float = 5.0
    ) -> PubAck:
        """As ``Connection.publish``, grouped with the appends made in the same turn."""
        if not self.enabled or "Nats-Rollup" in headers or self._in_flight >= MAX_IN_FLIGHT:
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

    async def _wait(self, item: _Append) -> int | None:
        try:
            return await item.outcome
        except asyncio.CancelledError:
            # Handed the turn, then cancelled before taking it: pass it on, or the queue
            # would wait for a sender that never comes.
            turn = item.outcome.done() and not item.outcome.cancelled()
            if turn and item.outcome.result() == _TURN:
                self._give_up_turn(item)
            raise

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
            self._give_up_turn(sender)
            raise
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        batch = [i for i in batch if i is sender or not i.outcome.done()]
        self._hand_on()  # past MAX_BATCH: the rest go next, without waiting for this batch
        if len(batch) < MIN_BATCH:
            for item in batch:
                if item is not sender:
                    item.outcome.set_result(None)  # each goes alone, at once
            return True
        seqs: list[int] | None = None
        self._in_flight += 1
        try:
            seqs = await self._atomic(batch, timeout)
        finally:
            self._in_flight -= 1
            for at, item in enumerate(batch):
                if not item.outcome.done():
                    item.outcome.set_result(seqs[at] if seqs is not None else None)
        return False

    def _give_up_turn(self, holder: _Append) -> None:
        """``holder`` was cancelled with the turn: the queue's next live append takes it."""
        if holder in self._queue:
            self._queue.remove(holder)
        self._hand_on()

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
