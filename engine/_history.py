"""The history store: conditional appends and whole-history reads.

This module is the one write path to history. Every append carries the run's expected last
sequence (``Nats-Expected-Last-Subject-Sequence`` over ``natflow.history.<run_id>.>``) and a
``Nats-Msg-Id`` unique to this append (the event id plus a nonce), so a retry deduplicates and
a writer can tell its own landed append from another writer's event at the same position.
The expected sequence is also the fencing token: a writer that read an older history, such as
a worker that lost its run, cannot append.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Final

import msgspec
import nats.errors
from nats.aio.msg import Msg

from ._connection import (
    ERR_WRONG_LAST_SEQUENCE,
    Connection,
    JetStreamError,
    NoResponders,
    RequestTimeout,
    retrying,
)
from ._errors import NatflowError, ServerUnavailable
from ._events import Event, decode_event, encode_event, event_type
from ._streams import HISTORY_STREAM, history_filter, history_subject

log = logging.getLogger("natflow.history")

_READ_BATCH: Final = 4096


class AppendConflict(NatflowError):
    """Someone else appended to the run since the writer read it (or the run already exists)."""

    def __init__(self, run_id: str, expected: int) -> None:
        super().__init__(
            f"run {run_id!r} changed since it was read (expected last sequence {expected})"
        )
        self.run_id = run_id
        self.expected = expected


@dataclass(slots=True)
class History:
    """A run's events, oldest first, and the stream sequence of the last one (0 if none)."""

    run_id: str
    events: list[Event] = field(default_factory=list)
    last_seq: int = 0

    @property
    def next_id(self) -> str:
        return f"{self.run_id}:{len(self.events) + 1}"


class _BatchRead:
    __slots__ = ("data", "done", "error", "last_seq", "pending")

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done = asyncio.get_running_loop().create_future()
        self.last_seq = 0
        self.pending = 0
        self.error: str | None = None


class HistoryStore:
    """Appends to and reads run histories in ``NATFLOW_HISTORY``."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._inbox_prefix: str | None = None
        self._reads: dict[str, _BatchRead] = {}
        self._counter = 0
        self._sub_lock = asyncio.Lock()
        self.retry_budget = 30.0  # seconds to ride out a restart or an election

    # -- appends ---------------------------------------------------------------------------

    async def append(self, run_id: str, event: Event, expected_seq: int) -> int:
        """Append ``event`` if the run's last sequence is still ``expected_seq``.

        Returns the new event's stream sequence. Raises :class:`AppendConflict` when the run
        moved on. An append whose acknowledgement was lost is retried with the same message id;
        the retry then meets "wrong last sequence", so the run's last event is read and compared
        by id to tell "it landed" from "someone else wrote".
        """
        data = encode_event(event)
        subject = history_subject(run_id, event_type(event))
        msg_id = f"{event.id}:{uuid.uuid4().hex[:16]}"
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": history_filter(run_id),
            "Nats-Msg-Id": msg_id,
        }

        async def attempt() -> int:
            try:
                ack = await self._conn.publish(subject, data, headers)
                return ack.seq
            except JetStreamError as exc:
                if exc.err_code != ERR_WRONG_LAST_SEQUENCE:
                    raise
            # The run moved on, or an earlier attempt of this append landed unacknowledged.
            landed = await self._landed(run_id, msg_id)
            if landed:
                return landed
            raise AppendConflict(run_id, expected_seq)

        return await retrying(f"append to run {run_id}", attempt, budget=self.retry_budget)

    async def _landed(self, run_id: str, msg_id: str) -> int:
        """The sequence of the run's last event if this writer's append put it there, else 0.

        Comparing the event id would not do: another writer appending at the same position
        uses the same id. The message id carries this append's own nonce.
        """
        msg = await self._last_msg(run_id)
        if msg is None:
            return 0
        headers = msg.headers or {}
        return int(headers["Nats-Sequence"]) if headers.get("Nats-Msg-Id") == msg_id else 0

    # -- reads -----------------------------------------------------------------------------

    async def last(self, run_id: str) -> tuple[Event, int] | None:
        """The run's last event and its sequence, or None if the run does not exist."""
        msg = await self._last_msg(run_id)
        if msg is None:
            return None
        return decode_event(msg.data), int((msg.headers or {})["Nats-Sequence"])

    async def _last_msg(self, run_id: str) -> Msg | None:
        subject = f"$JS.API.DIRECT.GET.{HISTORY_STREAM}.{history_filter(run_id)}"
        msg = await self._conn.request(subject, b"")
        headers = msg.headers or {}
        if headers.get("Status") == "404":
            return None
        if "Status" in headers:
            raise NatflowError(f"reading run {run_id!r} failed: {headers}")
        return msg

    async def read(self, run_id: str) -> History:
        """The whole history of a run in as few requests as its size allows (one, usually)."""
        return await retrying(
            f"reading run {run_id}", lambda: self._read(run_id), budget=self.retry_budget
        )

    async def _read(self, run_id: str) -> History:
        history = History(run_id)
        start = 1
        while True:
            read = await self._batch(run_id, start)
            history.events.extend(decode_event(d) for d in read.data)
            if read.last_seq:
                history.last_seq = read.last_seq
            if read.pending <= 0 or not read.data:
                return history
            start = read.last_seq + 1

    async def _batch(self, run_id: str, start: int) -> _BatchRead:
        prefix = await self._inbox()
        self._counter += 1
        token = str(self._counter)
        read = _BatchRead()
        self._reads[token] = read
        body = msgspec.json.encode(
            {
                "seq": start,
                "next_by_subj": history_filter(run_id),
                "batch": _READ_BATCH,
                "no_hdr": True,
            }
        )
        try:
            await self._conn.nc.publish(
                f"$JS.API.DIRECT.GET.{HISTORY_STREAM}", body, reply=f"{prefix}.{token}"
            )
            async with asyncio.timeout(5):
                await read.done
        except TimeoutError:
            raise RequestTimeout(f"reading the history of run {run_id!r} timed out") from None
        except nats.errors.ConnectionClosedError as exc:
            raise ServerUnavailable("NATS connection closed while reading history") from exc
        finally:
            self._reads.pop(token, None)
        if read.error is not None:
            if read.error.startswith("503"):
                raise NoResponders(f"$JS.API.DIRECT.GET.{HISTORY_STREAM}")
            raise NatflowError(f"reading the history of run {run_id!r} failed: {read.error}")
        return read

    async def _inbox(self) -> str:
        if self._inbox_prefix is None:
            async with self._sub_lock:
                if self._inbox_prefix is None:
                    prefix = self._conn.nc.new_inbox()
                    await self._conn.nc.subscribe(f"{prefix}.*", cb=self._on_reply)
                    self._inbox_prefix = prefix
        return self._inbox_prefix

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        read = self._reads.get(token)
        if read is None or read.done.done():
            return
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if status is None:
            read.data.append(msg.data)
            return
        if status == "204":  # end of batch
            read.last_seq = int(headers.get("Nats-Last-Sequence", "0")) if headers else 0
            read.pending = int(headers.get("Nats-Num-Pending", "0")) if headers else 0
        elif status != "404":  # 404: the run has no (more) events
            read.error = f"{status} {headers.get('Description', '') if headers else ''}"
        read.done.set_result(None)
