"""Signals: from any NATS client, through ``NATFLOW_SIGNALS``, into the run's history.

Anyone publishes ``natflow.signal.<run_id>.<name>`` with a JSON body (empty means ``null``)
and an optional ``Nats-Msg-Id`` (deduplicated stream-wide, so natflow scopes its own as
``<run_id>:<name>:<signal_id>``); the stream acknowledges it, and from then on it is durable.
The engine's intake reads every signal once: a good one wakes its run; a bad one (unknown or
finished run, malformed subject, body that is not JSON) goes to ``NATFLOW_DEADLETTER`` with
the reason, where ``natflow signals dead`` lists it.

The worker holding a run moves its signals into history (``signal_received``) in stream
order, from the last stream sequence history already has: exactly once, because it is the
run's only writer, and deduplicated by ``signal_id`` beyond the stream's 2-minute window.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Final

import anyio
import msgspec
from nats.aio.msg import Msg
from nats.js import api

from ._connection import Connection, PubAck, quietly, retrying
from ._errors import ErrorInfo, NatflowError
from ._history import CorruptHistory, HistoryStore
from ._level_read import first_start
from ._metrics import SIGNALS_RECEIVED, SIGNALS_REJECTED
from ._names import _TOKEN
from ._puller import Puller, engine_consumer
from ._reader import reader, stored_time, stream_bounds
from ._streams import (
    CONTROL_TOKEN,
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    HISTORY_STREAM,
    SIGNAL_PREFIX,
    SIGNAL_STREAM,
    history_subject,
    run_id_of,
    signal_filter,
    signal_subject,
)
from ._unclaimed import close_unclaimed
from ._undecodable import UNDECODABLE
from ._wake import run_start, wake
from .events import TERMINAL_EVENTS, Event, RunContinued, RunRestarted, decode_event, utcnow

log = logging.getLogger("natflow.signals")

INTAKE: Final = "natflow-engine-signals"
# Cancel, terminate, pause and resume, as the signal names history and the worker know them
# (`$` is outside the characters a user's signal name may use). They travel on a subject of
# their own, ``natflow.signal.<run_id>.$control.<cancel|terminate|pause|resume>``: five tokens,
# which the grant for ordinary signals (``natflow.signal.*.*``) does not match, so the right to
# cancel (or pause) is a NATS permission of its own (see _auth).
MAX_REASON: Final = 4096  # characters of a cancel reason recorded
CANCEL: Final = "$cancel"
TERMINATE: Final = "$terminate"
PAUSE: Final = "$pause"
RESUME: Final = "$resume"
CONTROL: Final = (CANCEL, TERMINATE, PAUSE, RESUME)
_CONTROL_BY_TOKEN: Final = {
    "cancel": CANCEL,
    "terminate": TERMINATE,
    "pause": PAUSE,
    "resume": RESUME,
}
# A child run's outcome, sent to its parent by the engine's dispatcher on
# ``natflow.signal.<parent>.$control.child``; the parent's worker records it as
# ``child_completed`` / ``child_failed``.
CHILD: Final = "$child"
_MAX_SHOWN_PAYLOAD: Final = 2048


def cancel_reason(payload: bytes) -> str | None:
    """The reason a cancel or terminate request carries (its JSON payload, if a string; at
    most :data:`MAX_REASON` characters, so that a huge one still cancels)."""
    try:
        value = msgspec.json.decode(payload)
    except UNDECODABLE:
        return None
    return (value[:MAX_REASON] or None) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal as read from the stream, checked."""

    seq: int
    run_id: str
    name: str
    payload: bytes  # valid JSON
    signal_id: str | None


class BadSignal(Exception):
    def __init__(self, seq: int, subject: str, name: str, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.subject, self.name, self.reason = seq, subject, name, reason


def parse(msg: Msg, seq: int) -> Signal:
    """Check one signal message; :class:`BadSignal` says what is wrong with it."""
    subject = (msg.headers or {}).get("Nats-Subject", msg.subject)  # direct gets name it so
    tokens = subject.split(".")
    name = tokens[3] if len(tokens) > 3 else ""
    if len(tokens) == 5 and name == CONTROL_TOKEN and tokens[4] in _CONTROL_BY_TOKEN:
        name = _CONTROL_BY_TOKEN[tokens[4]]
    elif len(tokens) == 5 and name == CONTROL_TOKEN and tokens[4] == "child":
        name = CHILD
    elif len(tokens) != 4:
        raise BadSignal(seq, subject, name, "subject must be natflow.signal.<run_id>.<signal_name>")
    elif name in CONTROL:  # the reserved names are only honoured on their own subject
        raise BadSignal(
            seq,
            subject,
            name,
            f"cancel, terminate, pause and resume are sent on natflow.signal.<run_id>."
            f"{CONTROL_TOKEN}.<cancel|terminate|pause|resume> (client.cancel, client.terminate, "
            "client.pause, client.resume), not as a signal name",
        )
    run_id = tokens[2]
    for kind, value in (("run id", run_id), ("signal name", name)):
        if (value in CONTROL or value == CHILD) and kind == "signal name":
            continue
        if _TOKEN.fullmatch(value) is None:
            raise BadSignal(
                seq, subject, name, f"invalid {kind} {value!r}: use A-Z, a-z, 0-9, '_' and '-'"
            )
    payload = msg.data or b"null"
    try:
        msgspec.json.decode(payload)
    except UNDECODABLE as exc:
        raise BadSignal(seq, subject, name, f"body is not JSON: {exc}") from None
    signal_id = (msg.headers or {}).get("Nats-Msg-Id")
    return Signal(seq=seq, run_id=run_id, name=name, payload=payload, signal_id=signal_id)


async def pending_signals(conn: Connection, run_id: str, after: int) -> list[Msg]:
    """The run's signals with a stream sequence above ``after``, in order."""
    page = await reader(conn).read_all(
        SIGNAL_STREAM, signal_filter(run_id), start=after + 1, headers=True
    )
    return page.messages


def sequence(msg: Msg) -> int:
    return int((msg.headers or {})["Nats-Sequence"])


def stored_at(msg: Msg) -> datetime:
    """When the server stored a message read by a direct get (its ``Nats-Time-Stamp``)."""
    return stored_time(msg.headers or {})


async def run_created_at(conn: Connection, run_id: str) -> datetime | None:
    """When the server stored the run's first event (None if there is no such run)."""
    msg = await first_start(conn, run_id)
    return None if msg is None else stored_at(msg)


async def last_signal_seq(conn: Connection, run_id: str) -> int:
    """The stream sequence of the run's newest signal (0 if none)."""
    msg = await conn.request(f"{conn.api}.DIRECT.GET.{SIGNAL_STREAM}.{signal_filter(run_id)}", b"")
    headers = msg.headers or {}
    return 0 if "Status" in headers else int(headers["Nats-Sequence"])


def control_request(subject: str) -> str | None:
    """:data:`CANCEL`, :data:`TERMINATE`, :data:`PAUSE` or :data:`RESUME` if ``subject`` is a
    run's control request (``natflow.signal.<run_id>.$control.<kind>``), else None."""
    tokens = subject.split(".")
    if len(tokens) == 5 and tokens[3] == CONTROL_TOKEN:
        return _CONTROL_BY_TOKEN.get(tokens[4])
    return None


def scoped_signal_id(run_id: str, name: str, signal_id: str) -> str:
    """The ``Nats-Msg-Id`` of a signal with a caller's id: ``<run_id>:<name>:<signal_id>``.

    The stream deduplicates message ids across all its subjects, so an id alone would make a
    signal to one run a "duplicate" of another run's; scoped, the same id means the same
    signal only for the same run and name.
    """
    return f"{run_id}:{name}:{signal_id}"


async def send(
    conn: Connection, run_id: str, name: str, payload: bytes, signal_id: str | None
) -> PubAck:
    """Publish a signal, retrying through a reconnect or a leader election. Every attempt
    carries the same message id (the caller's ``signal_id`` scoped to the run and name, or
    one made here), so a retry of a signal that landed unacknowledged is stored once.

    A duplicate is only a success when the stored signal went to the same run and name
    (the same call repeated); otherwise :class:`NatflowError` names the other subject."""
    msg_id = (
        scoped_signal_id(run_id, name, signal_id)
        if signal_id is not None
        else f"natflow-{uuid.uuid4().hex}"
    )
    subject = signal_subject(run_id, name)
    ack = await retrying(
        f"sending signal {name!r} to run {run_id}",
        lambda: conn.publish(subject, payload, {"Nats-Msg-Id": msg_id}),
    )
    if ack.duplicate:
        body = msgspec.json.encode({"seq": ack.seq})
        stored = await conn.request(f"{conn.api}.DIRECT.GET.{SIGNAL_STREAM}", body)
        other = (stored.headers or {}).get("Nats-Subject", subject)
        if other != subject:
            raise NatflowError(
                f"signal id {msg_id!r} was already used by signal #{ack.seq} on {other}; "
                f"this signal to run {run_id!r} was not stored: use another id"
            )
    return ack


class ChildOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of a ``$child`` signal: how child run ``child_run_id`` ended."""

    child_run_id: str
    status: str  # completed, failed, cancelled, terminated
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorInfo | None = None
    reason: str | None = None


_outcome_decoder = msgspec.json.Decoder(ChildOutcome)


def decode_child_outcome(payload: bytes) -> ChildOutcome:
    return _outcome_decoder.decode(payload)


async def send_child_outcome(conn: Connection, parent: str, outcome: ChildOutcome) -> None:
    """Tell the parent how its child ended: once, however often this is called (the message
    id is derived from both run ids, and the parent's worker also ignores a second one)."""
    await send(
        conn,
        parent,
        CHILD,
        msgspec.json.encode(outcome),
        f"{outcome.child_run_id}",
    )


# -- dead letters ------------------------------------------------------------------------


class DeadLetter(msgspec.Struct, kw_only=True):
    """An undeliverable signal: where it was sent, why it was not delivered, what it held."""

    v: int = 1
    kind: str = "signal"
    subject: str
    run_id: str
    name: str
    reason: str
    signal_seq: int
    at: datetime
    payload: str = ""


_dl_encoder = msgspec.json.Encoder()
_dl_decoder = msgspec.json.Decoder(DeadLetter)


async def dead_letter_item(
    conn: Connection,
    kind: str,
    subject: str,
    reason: str,
    seq: int,
    payload: bytes,
    *,
    run_id: str = "",
    name: str = "",
) -> None:
    """Dead-letter something other than a signal (a task, a KV entry) with the reason; one
    letter per ``(kind, seq)``, however many processes meet it."""
    letter = DeadLetter(
        kind=kind,
        subject=subject,
        run_id=run_id,
        name=name,
        reason=reason,
        signal_seq=seq,
        at=utcnow(),
        payload=payload[:_MAX_SHOWN_PAYLOAD].decode(errors="replace"),
    )
    token = run_id if _TOKEN.fullmatch(run_id) else "_"
    await conn.publish(
        f"{DEADLETTER_PREFIX}.{kind}.{token}",
        _dl_encoder.encode(letter),
        {"Nats-Msg-Id": f"{kind}-{subject}-{seq}"},
    )


async def dead_letters(conn: Connection, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters, newest first."""
    bounds = await stream_bounds(conn, DEADLETTER_STREAM)
    if bounds is None:
        return []
    first, last = bounds
    start = max(first, last - limit + 1)
    page = await reader(conn).read_all(DEADLETTER_STREAM, start=start, limit=limit)
    return [_dl_decoder.decode(m.data) for m in reversed(page.messages)]


# -- the engine's intake -----------------------------------------------------------------


def intake_config() -> api.ConsumerConfig:
    return engine_consumer(
        INTAKE,
        "natflow engine: check signals, wake their runs, dead-letter bad ones",
        f"{SIGNAL_PREFIX}.>",
    )


class SignalIntake:
    """Reads each signal once: wakes its run, or dead-letters it with the reason.

    Signals are taken as they arrive, up to :data:`_WINDOW` at a time, and handled as one
    batch: one request looks up the last event of every run they name (a multi-last direct
    get), each live run is woken once, and the dead letters are published together. A flood
    of signals to unknown or finished runs is handled at thousands per second, so a good
    signal behind it is not held up for long. Every signal of a batch was stored before the
    look-up, so "no run has this id" holds for each (it never reaches a run created later).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.received = 0
        self.rejected = 0
        self._held = 0  # taken from the consumer, not yet acknowledged
        self._backlog: list[tuple[Msg, BadSignal]] = []
        self._more_bad = anyio.Event()
        self._taking = False

    async def run(self) -> None:
        config = intake_config()
        await self._conn.admin(
            "the signal intake's consumer",
            lambda: self._conn.jsm.add_consumer(SIGNAL_STREAM, config=config),
        )
        puller = Puller(self._conn, SIGNAL_STREAM, INTAKE)
        await puller.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(puller.keep_asking, lambda: _WINDOW - self._held)
                tg.start_soon(self._dead_letter_backlog, puller)
                async for first in puller.messages:
                    batch = [first]
                    while len(batch) < _BATCH:
                        try:
                            batch.append(puller.messages.receive_nowait())
                        except anyio.WouldBlock:
                            break
                    self._held += len(batch)
                    self._taking = True
                    try:
                        await self._take(batch)
                    except Exception as exc:  # a bug must not stop the intake: retry later
                        log.error("signal intake: batch failed (%s); retrying", exc, exc_info=exc)
                        await self._nak(batch)
                    finally:
                        self._taking = False
                    puller.wake()
        finally:
            # Shielded: a cancelled intake that kept this subscription would keep receiving
            # (and never acknowledging) the signals its outstanding pull asked for.
            with anyio.CancelScope(shield=True):
                try:
                    await puller.stop()
                except Exception:  # the connection is going away; the server drops the pull
                    log.debug("unsubscribe failed", exc_info=True)

    async def _take(self, msgs: list[Msg]) -> None:
        """Handle a batch: wake each live run once; queue the rest for dead letters."""
        good: dict[str, list[tuple[Msg, Signal]]] = {}
        bad: list[tuple[Msg, BadSignal]] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            try:
                signal = parse(msg, seq)
            except BadSignal as exc:
                bad.append((msg, exc))
                continue
            good.setdefault(signal.run_id, []).append((msg, signal))
        try:
            lasts = await last_events(self._conn, list(good))
        except Exception as exc:  # the server could not be read: try again soon
            log.warning("signal intake: could not look runs up (%s); retrying", exc)
            await self._nak([m for sigs in good.values() for m, _ in sigs])
            good, lasts = {}, {}
        taken: list[Msg] = []
        for run_id in list(good):
            reason = _undeliverable(lasts.get(run_id))
            if reason is not None:
                sigs = good.pop(run_id)
                # A worker woken by an earlier signal takes in every one stored, and may end
                # the run before this intake gets to them: those are not undeliverable. (A
                # run that does not exist took none: no read for a flood of unknown ids.)
                ended = lasts.get(run_id) is not None
                cursor = await self._taken_until(run_id) if ended else 0
                taken += [m for m, sig in sigs if sig.seq <= cursor]
                bad += [
                    (m, BadSignal(sig.seq, m.subject, sig.name, reason))
                    for m, sig in sigs
                    if sig.seq > cursor
                ]
        if taken:
            await self._ack(taken)
        if bad:
            self._backlog += bad
            self._more_bad.set()
        await asyncio.gather(*(self._wake(run_id, sigs) for run_id, sigs in good.items()))

    async def _taken_until(self, run_id: str) -> int:
        """The signal stream sequence up to which the run's history took signals in (0 where
        it cannot be read: the signal is then dead-lettered as before)."""
        try:
            history = await HistoryStore(self._conn).read(run_id, lenient=True)
        except NatflowError as exc:
            log.debug("run %s: history not read for its signals (%s)", run_id, exc)
            return 0
        return taken_until(history.events)

    async def _dead_letter_backlog(self, puller: Puller) -> None:
        """Dead-letter bad signals in the background, so that they hold up no good one."""
        while True:
            await self._more_bad.wait()
            self._more_bad = anyio.Event()
            while self._backlog:
                # Signals still to look at come first: a good one may be among them.
                while puller.messages.statistics().current_buffer_used or self._taking:  # noqa: ASYNC110 - a poll of two conditions
                    await anyio.sleep(0.005)
                chunk = self._backlog[:_DEAD_LETTER_CHUNK]
                del self._backlog[:_DEAD_LETTER_CHUNK]
                await self._reject_all(chunk)
                puller.wake()

    async def _nak(self, msgs: list[Msg]) -> None:
        self._held = max(0, self._held - len(msgs))
        await asyncio.gather(*(_quietly(partial(m.nak, delay=1.0)) for m in msgs))

    async def _ack(self, msgs: list[Msg]) -> None:
        self._held = max(0, self._held - len(msgs))
        await asyncio.gather(*(_quietly(m.ack) for m in msgs))

    async def _wake(self, run_id: str, signals: list[tuple[Msg, Signal]]) -> None:
        names = ", ".join(sorted({sig.name for _, sig in signals}))
        stop = next((sig for _, sig in signals if sig.name in (CANCEL, TERMINATE)), None)
        try:
            start = await run_start(self._conn, run_id)
            if start is None:  # its history was read a moment ago: a replica lagging
                raise NatflowError(f"run {run_id} has no run_started")
            if stop is None or not await close_unclaimed(  # no worker has taken the run yet
                self._conn,
                run_id,
                terminate=stop.name == TERMINATE,
                reason=cancel_reason(stop.payload),
            ):
                await wake(self._conn, start, run_id, f"signal {names}")
        except CorruptHistory as bad:  # no task can be made for it: nothing would read them
            reason = f"the run's history is corrupt: {bad.reason}"
            self._backlog += [
                (m, BadSignal(sig.seq, m.subject, sig.name, reason)) for m, sig in signals
            ]
            self._more_bad.set()
            return
        except Exception as exc:
            log.warning("signals of run %s: wake-up failed (%s); retrying", run_id, exc)
            await self._nak([m for m, _ in signals])
            return
        self.received += len(signals)
        # Signals to the workflow, as the workers' delivered count them: not the controls
        # (cancel, pause, ...) or a child's outcome, which no workflow waits for by name.
        sent = sum(1 for _, sig in signals if sig.name not in CONTROL and sig.name != CHILD)
        if sent:
            SIGNALS_RECEIVED.labels(start.workflow).inc(sent)
        await self._ack([m for m, _ in signals])

    async def _reject_all(self, bad: list[tuple[Msg, BadSignal]]) -> None:
        if not bad:
            return
        results = await asyncio.gather(
            *(self._dead_letter(m, b) for m, b in bad), return_exceptions=True
        )
        failed = [m for (m, _), r in zip(bad, results, strict=True) if r is not None]
        done = [m for (m, _), r in zip(bad, results, strict=True) if r is None]
        await self._nak(failed)
        await self._ack(done)
        self.rejected += len(done)
        SIGNALS_REJECTED.labels("engine").inc(len(done))
        reasons = Counter(b.reason for (_, b), r in zip(bad, results, strict=True) if r is None)
        shown = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
        log.warning("dead-lettered %d signals (%s)", len(done), shown)
        if failed:
            log.warning("could not dead-letter %d signals (%s); retrying", len(failed), results)

    async def _dead_letter(self, msg: Msg, bad: BadSignal) -> None:
        seq = msg.metadata.sequence.stream
        letter = DeadLetter(
            subject=msg.subject,
            run_id=_run_token(msg.subject),
            name=bad.name,
            reason=bad.reason,
            signal_seq=seq,
            at=utcnow(),
            payload=msg.data[:_MAX_SHOWN_PAYLOAD].decode(errors="replace"),
        )
        token = letter.run_id if _TOKEN.fullmatch(letter.run_id) else "_"
        await self._conn.publish(
            f"{DEADLETTER_PREFIX}.{letter.kind}.{token}",
            _dl_encoder.encode(letter),
            {"Nats-Msg-Id": f"signal-{seq}"},
        )
        log.debug("signal %s (#%d) dead-lettered: %s", msg.subject, seq, bad.reason)


# Signals taken from the consumer and not yet acknowledged: enough that a flood of bad ones
# (dead-lettered in the background) does not keep a good one behind it from arriving.
_WINDOW: Final = 16_384
_BATCH: Final = 1024  # signals looked at together
_DEAD_LETTER_CHUNK: Final = 256  # dead letters published together


async def last_events(conn: Connection, run_ids: list[str]) -> dict[str, bytes]:
    """The last history event (encoded) of each run that exists, in as few requests as the
    number of runs allows (multi-last direct gets)."""
    subjects = [history_subject(r) for r in run_ids]
    # The last message of each of a run's subjects (start, run-level, step-level): the run's
    # last is the latest of them.
    msgs = await reader(conn).read_last_each(HISTORY_STREAM, subjects, per_subject=3)
    newest: dict[str, tuple[int, bytes]] = {}
    for msg in msgs:
        headers = msg.headers or {}
        run_id = run_id_of(headers.get("Nats-Subject", ""))
        seq = int(headers.get("Nats-Sequence", "0"))
        if seq >= newest.get(run_id, (0, b""))[0]:
            newest[run_id] = (seq, msg.data)
    return {run_id: data for run_id, (_, data) in newest.items()}


def taken_until(events: list[Event]) -> int:
    """The signal stream sequence up to which a run's history took its signals in (a worker
    takes them in order: signals, controls, child outcomes, each recording its sequence)."""
    cursor = 0
    for event in events:
        seq = getattr(event, "signal_seq", 0)
        if isinstance(event, RunContinued):
            seq = event.signal_cursor
        if isinstance(seq, int) and seq > cursor:
            cursor = seq
    return cursor


def _undeliverable(last: bytes | None) -> str | None:
    """Why a run with this last event takes no signal (None: it takes them)."""
    if last is None:
        return "no run has this id"
    try:
        event = decode_event(last)
    except UNDECODABLE:  # the worker holds such a run as blocked; wake it
        return None
    if isinstance(event, TERMINAL_EVENTS):
        return f"the run already ended ({str(event.__struct_config__.tag)[4:]})"
    if isinstance(event, RunRestarted):
        return f"the run already ended and was restarted as {event.restarted_as}"
    return None


def _run_token(subject: str) -> str:
    return subject.split(".")[2] if subject.count(".") >= 2 else ""


async def _quietly(op: Callable[[], Awaitable[None]]) -> None:
    # Called here, not by the caller: gather may cancel this before it runs (the service is
    # stopping), and an acknowledgement made and never awaited would be reported as such.
    await quietly(op())  # it comes back by itself
