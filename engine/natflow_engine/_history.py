"""The history store: conditional appends and whole-history reads.

This module is the one write path to history. Every append carries the run's expected last
sequence (``Nats-Expected-Last-Subject-Sequence``, checked against all of the run's subjects,
``natflow.history.<run_id>.>``: see ``_streams``) and a
``Nats-Msg-Id`` unique to this append (the event id plus a nonce), so a retry deduplicates and
a writer can tell its own landed append from another writer's event at the same position.
The expected sequence is also the fencing token: a writer that read an older history, such as
a worker that lost its run, cannot append.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime

import msgspec
from nats.aio.msg import Msg

from ._append_batch import HISTORY_SENDING, appender
from ._connection import (
    ERR_ROLLUP_NOT_PERMITTED,
    Connection,
    JetStreamError,
    retrying,
)
from ._errors import NatflowError
from ._level_read import read_by_level
from ._reader import reader, stored_time
from ._sealing import seal_event
from ._streams import (
    HISTORY_STREAM,
    event_subject,
    history_subject,
    is_start_subject,
    run_id_of,
    run_level_subject,
)
from ._undecodable import UNDECODABLE
from ._values import store_event
from .events import Event, RunContinued, RunStarted, decode_event, encode_event, unpacked

log = logging.getLogger("natflow.history")


def _start_of(run_id: str, subject: str) -> bool:
    """Whether a start stored on ``subject`` is ``run_id``'s: on its start subject, or (a
    delayed start, an older natflow's) on its run-level subject."""
    return subject == run_level_subject(run_id) or (
        is_start_subject(subject) and run_id_of(subject) == run_id
    )


def start_history(
    run_id: str, subject: str, data: bytes, seq: int, *, decoded: Event | None = None
) -> History | None:
    """The history a brand-new run's start stored at ``seq`` on ``subject`` makes, or None
    if it is not ``run_id``'s first start. What a start consumer delivers is the stored
    message itself, so it needs no lookup (:meth:`HistoryStore.read_start` makes one for a
    task's hint). Like that lookup, it shows nothing stored after the start. ``decoded``:
    the event ``data`` holds, where the caller has decoded it already."""
    if not _start_of(run_id, subject):
        return None
    try:
        event = decoded if decoded is not None else decode_event(data)
    except UNDECODABLE:
        return None  # the whole read names the bad event
    # Only a brand-new run's start is written with nothing before it (``Runs.start``
    # appends it expecting no event). A continuation (a RunStarted subclass) follows
    # older step events of its run.
    if type(event) is not RunStarted or event.restarted_from:
        return None
    return History(run_id, [event], last_seq=seq)


class _Nonces:
    """Append nonces unique across processes and restarts: 64 random bits drawn once per
    process (again in a forked child), then a counter. A ``uuid4`` per append cost a
    system call and ~5 us on the worker's per-step path."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


_nonces = _Nonces()


class AppendConflict(NatflowError):
    """Someone else appended to the run since the writer read it (or the run already exists)."""

    def __init__(self, run_id: str, expected: int) -> None:
        super().__init__(
            f"run {run_id!r} changed since it was read (expected last sequence {expected})"
        )
        self.run_id = run_id
        self.expected = expected


class CorruptHistory(NatflowError):
    """An event in a run's history does not decode: the run cannot be replayed.

    ``seq`` is the bad message's stream sequence; ``last_seq`` the run's last sequence and
    ``count`` how many messages its history holds (for an append that blocks the run);
    ``last`` the run's last event if that one decodes.
    """

    def __init__(
        self, run_id: str, seq: int, reason: str, *, last_seq: int, count: int, last: Event | None
    ) -> None:
        super().__init__(
            f"run {run_id!r}: history event at stream sequence {seq} cannot be decoded "
            f"({reason}); the run is held as blocked. Inspect it with `nats stream get "
            f"{HISTORY_STREAM} {seq}`; cancel or terminate it to close it"
        )
        self.run_id, self.seq, self.reason = run_id, seq, reason
        self.last_seq, self.count, self.last = last_seq, count, last


@dataclass(slots=True)
class History:
    """A run's events, oldest first, and the stream sequence of the last one (0 if none).

    A lenient read leaves out events that do not decode and lists them in ``corrupt`` as
    ``(stream sequence, reason)``.
    """

    run_id: str
    events: list[Event] = field(default_factory=list)
    last_seq: int = 0
    corrupt: list[tuple[int, str]] = field(default_factory=list)


class HistoryStore:
    """Appends to and reads run histories in ``NATFLOW_HISTORY``."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._reader = reader(conn)
        # Many runs' appends in one batch, where the server's sync mode makes that pay.
        self._appends = appender(conn, HISTORY_STREAM, sending=HISTORY_SENDING)
        self.retry_budget = 30.0  # seconds to ride out a restart or an election

    # -- appends ---------------------------------------------------------------------------

    def next_append_alone(self) -> bool:
        """Whether an append made now (one that is not a rollup) is handed to the connection
        before :meth:`append` first waits, rather than queued for a batch."""
        return self._appends.next_alone()

    async def append(
        self,
        run_id: str,
        event: Event,
        expected_seq: int,
        *,
        rollup: bool = False,
        subject: str | None = None,
    ) -> int:
        """Append ``event`` if the run's last sequence is still ``expected_seq``.

        ``subject``: where to store it, if not where its kind goes (a start that its workers
        take from history: ``start_subject``).

        With ``rollup`` the event replaces the run's whole history in the same step
        (``Nats-Rollup: sub``; continue-as-new), fenced by ``expected_seq`` like any append.

        Returns the new event's stream sequence. Raises :class:`AppendConflict` when the run
        moved on. An append whose acknowledgement was lost is retried with the same message id;
        the retry then meets "wrong last sequence", so the run's last event is read and compared
        by id to tell "it landed" from "someone else wrote".
        """
        # Sealed, then a large value stored by reference (the object before the history).
        stored = await store_event(self._conn, seal_event(self._conn.codec, event), run_id)
        data = encode_event(stored)
        subject = subject or event_subject(run_id, str(event.__struct_config__.tag))
        msg_id = f"{event.id}:{_nonces.next()}"
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": history_subject(run_id),
            "Nats-Msg-Id": msg_id,
        }
        if rollup:
            headers["Nats-Rollup"] = "sub"

        async def attempt() -> int:
            try:
                ack = await self._appends.publish(subject, data, headers)
                return ack.seq
            except JetStreamError as exc:
                if exc.err_code == ERR_ROLLUP_NOT_PERMITTED:
                    raise NatflowError(
                        f"run {run_id!r} cannot continue as new: stream {HISTORY_STREAM} was "
                        "created by an older natflow without allow_rollup_hdrs; start the "
                        "engine (`natflow engine`) or run `natflow init` as a user with the "
                        "engine role once, which updates it in place"
                    ) from exc
                if not exc.wrong_last_sequence:
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
        seq = int((msg.headers or {})["Nats-Sequence"])
        try:
            return decode_event(msg.data), seq
        except UNDECODABLE as exc:
            raise CorruptHistory(run_id, seq, str(exc), last_seq=seq, count=0, last=None) from None

    async def last_stored(self, run_id: str) -> tuple[int, datetime] | None:
        """The sequence of the run's last event and when the server stored it (its clock,
        not the writer's), or None if the run does not exist."""
        msg = await self._last_msg(run_id)
        if msg is None:
            return None
        headers = msg.headers or {}
        return int(headers["Nats-Sequence"]), stored_time(headers)

    async def exists(self, run_id: str) -> bool:
        """Whether the run has any history (its last event need not decode)."""
        return await self._last_msg(run_id) is not None

    async def _last_msg(self, run_id: str) -> Msg | None:
        # In the body: a wildcard may not appear in a subject one publishes to.
        body = msgspec.json.encode({"last_by_subj": history_subject(run_id)})
        msg = await self._conn.request(f"{self._conn.api}.DIRECT.GET.{HISTORY_STREAM}", body)
        headers = msg.headers or {}
        if headers.get("Status") == "404":
            return None
        if "Status" in headers:
            raise NatflowError(f"reading run {run_id!r} failed: {headers}")
        return msg

    async def read(self, run_id: str, *, lenient: bool = False) -> History:
        """The whole history of a run in as few requests as its size allows (one, usually).

        An event that does not decode raises :class:`CorruptHistory`; with ``lenient`` it is
        left out and listed in ``History.corrupt`` instead (for inspecting such a run).
        """
        return await retrying(
            f"reading run {run_id}",
            lambda: self._read(run_id, lenient),
            budget=self.retry_budget,
        )

    async def read_start(self, run_id: str, seq: int) -> History | None:
        """The run's start, read by its stream sequence ``seq``, as a history that ends
        there; None if the message at ``seq`` is not this run's first start (a stale or
        forged hint, or a replica behind).

        One lookup on the server, where :meth:`read` walks the stream's newer messages
        (all of them, for a run as new as this). It does not show what follows the start:
        only a caller that holds proof the start is the run's last event (a claim appended
        conditionally on ``seq``) may take it as the whole history.
        """
        msg = await retrying(
            f"reading run {run_id}",
            lambda: self._reader.get(HISTORY_STREAM, seq),
            budget=self.retry_budget,
        )
        if msg is None:
            return None
        return start_history(run_id, (msg.headers or {}).get("Nats-Subject", ""), msg.data, seq)

    async def _read(self, run_id: str, lenient: bool) -> History:
        placed = await read_by_level(self._reader, run_id)
        if placed is not None:
            return History(run_id, placed[0], placed[1])
        page = await self._reader.read_all(HISTORY_STREAM, history_subject(run_id))
        try:
            events = unpacked([decode_event(m.data) for m in page.messages])
            return History(run_id, current_stretch(events), page.last_seq)
        except UNDECODABLE:
            pass  # read again with headers, to name the bad message's sequence
        page = await self._reader.read_all(HISTORY_STREAM, history_subject(run_id), headers=True)
        history = History(run_id, last_seq=page.last_seq)
        for msg in page.messages:
            try:
                history.events.append(decode_event(msg.data))
            except UNDECODABLE as exc:
                history.corrupt.append((_seq_of(msg), str(exc)))
        history.events = current_stretch(unpacked(history.events))
        if history.corrupt and not lenient:
            seq, reason = history.corrupt[0]
            last = history.events[-1] if history.events else None
            if last is not None and history.corrupt[-1][0] == page.last_seq:
                last = None  # the last message itself is the bad one
            raise CorruptHistory(
                run_id, seq, reason, last_seq=page.last_seq, count=len(page.messages), last=last
            )
        return history


def current_stretch(events: list[Event]) -> list[Event]:
    """The events from the newest ``run_continued`` on (all of them if there is none).

    A continuation's rollup drops the run's older run-level events at once; its older step
    events stay until the engine purges them, and are no part of the run any more.
    """
    for at in range(len(events) - 1, 0, -1):
        if type(events[at]) is RunContinued:
            return events[at:]
    return events


def _seq_of(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get("Nats-Sequence", "0"))
    except ValueError:
        return 0
