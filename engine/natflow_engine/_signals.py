"""Signals: from any NATS client, through ``NATFLOW_SIGNALS``, into the run's history.

Anyone publishes ``natflow.signal.<run_id>.<name>`` with a JSON body (empty means ``null``)
and an optional ``Nats-Msg-Id``; the stream acknowledges it, and from then on it is durable.
The engine's intake reads every signal once: a good one wakes its run; a bad one (unknown or
finished run, malformed subject, body that is not JSON) goes to ``NATFLOW_DEADLETTER`` with
the reason, where ``natflow signals dead`` lists it.

The worker holding a run moves its signals into history (``signal_received``) in stream
order, from the last stream sequence history already has: exactly once, because it is the
run's only writer, and deduplicated by ``signal_id`` beyond the stream's 2-minute window.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from ._connection import Connection, PubAck, retrying
from ._history import HistoryStore
from ._logs import fields
from ._metrics import SIGNALS_RECEIVED, SIGNALS_REJECTED
from ._names import _TOKEN
from ._puller import engine_consumer
from ._reader import reader
from ._streams import (
    DEADLETTER_PREFIX,
    DEADLETTER_STREAM,
    HISTORY_STREAM,
    SIGNAL_PREFIX,
    SIGNAL_STREAM,
    history_subject,
    signal_filter,
    signal_subject,
)
from ._wake import run_start, wake
from .events import TERMINAL_EVENTS, RunRestarted, utcnow

log = logging.getLogger("natflow.signals")

INTAKE: Final = "natflow-engine-signals"
# Reserved names: `$` is outside the characters a user's signal name may use.
CANCEL: Final = "$cancel"
TERMINATE: Final = "$terminate"
PAUSE: Final = "$pause"
RESUME: Final = "$resume"
CONTROL: Final = (CANCEL, TERMINATE, PAUSE, RESUME)
_MAX_SHOWN_PAYLOAD: Final = 2048


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
    if len(tokens) != 4:
        raise BadSignal(seq, subject, name, "subject must be natflow.signal.<run_id>.<signal_name>")
    run_id = tokens[2]
    for kind, value in (("run id", run_id), ("signal name", name)):
        if value in CONTROL and kind == "signal name":
            continue
        if _TOKEN.fullmatch(value) is None:
            raise BadSignal(
                seq, subject, name, f"invalid {kind} {value!r}: use A-Z, a-z, 0-9, '_' and '-'"
            )
    payload = msg.data or b"null"
    try:
        msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
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
    stamp = (msg.headers or {})["Nats-Time-Stamp"]
    head, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00")


async def run_created_at(conn: Connection, run_id: str) -> datetime | None:
    """When the server stored the run's first event (None if there is no such run)."""
    body = msgspec.json.encode({"seq": 1, "next_by_subj": history_subject(run_id)})
    msg = await conn.request(f"{conn.api}.DIRECT.GET.{HISTORY_STREAM}", body)
    return None if "Status" in (msg.headers or {}) else stored_at(msg)


async def last_signal_seq(conn: Connection, run_id: str) -> int:
    """The stream sequence of the run's newest signal (0 if none)."""
    msg = await conn.request(f"{conn.api}.DIRECT.GET.{SIGNAL_STREAM}.{signal_filter(run_id)}", b"")
    headers = msg.headers or {}
    return 0 if "Status" in headers else int(headers["Nats-Sequence"])


async def send(
    conn: Connection, run_id: str, name: str, payload: bytes, signal_id: str | None
) -> PubAck:
    """Publish a signal, retrying through a reconnect or a leader election. Every attempt
    carries the same message id (the caller's ``signal_id``, or one made here), so a retry
    of a signal that landed unacknowledged is stored once."""
    headers = {"Nats-Msg-Id": signal_id or f"natflow-{uuid.uuid4().hex}"}
    subject = signal_subject(run_id, name)
    return await retrying(
        f"sending signal {name!r} to run {run_id}",
        lambda: conn.publish(subject, payload, headers),
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


async def dead_letter(conn: Connection, letter: DeadLetter) -> None:
    token = letter.run_id if _TOKEN.fullmatch(letter.run_id) else "_"
    await conn.publish(
        f"{DEADLETTER_PREFIX}.{letter.kind}.{token}",
        _dl_encoder.encode(letter),
        {"Nats-Msg-Id": f"signal-{letter.signal_seq}"},
    )
    log.warning(
        "signal %s (#%d) dead-lettered: %s",
        letter.subject,
        letter.signal_seq,
        letter.reason,
        extra=fields(letter.run_id or None, signal=letter.name),
    )


async def dead_letters(conn: Connection, limit: int = 100) -> list[DeadLetter]:
    """The newest dead letters, newest first."""
    info = await conn.jsm.stream_info(DEADLETTER_STREAM)
    start = max(info.state.first_seq, info.state.last_seq - limit + 1)
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
    """Reads each signal once: wakes its run, or dead-letters it with the reason."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._history = HistoryStore(conn)
        self.received = 0
        self.rejected = 0

    async def run(self) -> None:
        config = intake_config()
        await self._conn.admin(
            "the signal intake's consumer",
            lambda: self._conn.jsm.add_consumer(SIGNAL_STREAM, config=config),
        )
        sub = await self._conn.js.pull_subscribe_bind(durable=INTAKE, stream=SIGNAL_STREAM)
        try:
            while True:
                try:
                    msgs = await sub.fetch(batch=1, timeout=5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    log.warning("signal intake fetch failed (%s); retrying in 1 s", exc)
                    await anyio.sleep(1.0)
                    continue
                for msg in msgs:
                    await self._take(msg)
        finally:
            # Shielded: a pull subscription left open holds up the connection's drain (nats-py
            # leaves messages it fetched marked unfinished) for its whole 30 s timeout.
            try:
                with anyio.CancelScope(shield=True):
                    await sub.unsubscribe()
            except Exception:  # the connection is going away; the server drops the pull
                log.debug("unsubscribe failed", exc_info=True)

    async def _take(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        try:
            signal = parse(msg, seq)
            start = await run_start(self._conn, signal.run_id)
            if start is None:
                raise BadSignal(seq, msg.subject, signal.name, "no run has this id")
            last = await self._history.last(signal.run_id)
            if last is not None and isinstance(last[0], (*TERMINAL_EVENTS, RunRestarted)):
                raise BadSignal(
                    seq,
                    msg.subject,
                    signal.name,
                    f"the run has already {str(last[0].__struct_config__.tag)[4:]}",
                )
            await wake(self._conn, start, signal.run_id, f"signal {signal.name}")
            self.received += 1
            SIGNALS_RECEIVED.labels(start.workflow).inc()
        except BadSignal as bad:
            self.rejected += 1
            run_id = msg.subject.split(".")[2] if msg.subject.count(".") >= 2 else ""
            await dead_letter(
                self._conn,
                DeadLetter(
                    subject=msg.subject,
                    run_id=run_id,
                    name=bad.name,
                    reason=bad.reason,
                    signal_seq=seq,
                    at=utcnow(),
                    payload=msg.data[:_MAX_SHOWN_PAYLOAD].decode(errors="replace"),
                ),
            )
            SIGNALS_REJECTED.labels("engine").inc()
        except Exception as exc:  # the server or the run could not be read: try again soon
            log.warning("signal #%d: could not process (%s); retrying", seq, exc)
            await msg.nak(delay=1.0)
            return
        await msg.ack()
