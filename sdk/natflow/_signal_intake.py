"""Moving a run's new signals from the signal stream into its history, in order.

Besides the workflow's own signals, the stream carries control signals: cancel and terminate
(recorded as a cancel request), pause and resume, and ``$child``, a child run's outcome sent
by the engine. A signal that cannot be taken in (malformed, sent before the run existed, too
large for history) is recorded as rejected, so the cursor moves past it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Final

import msgspec
from natflow_engine import (
    CHILD,
    CONTROL,
    PAUSE,
    RESUME,
    SIGNALS_DELIVERED,
    SIGNALS_REJECTED,
    TERMINATE,
    UNDECODABLE,
    BadSignal,
    MissingKey,
    PayloadTooLarge,
    UnreadableValue,
    WrongKey,
    cancel_reason,
    decode_child_outcome,
    load_value,
    open_sealed,
    parse,
    pending_signals,
    quarantined,
    sequence,
    stored_at,
)
from natflow_engine.events import (
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    RunPaused,
    RunResumed,
    SignalReceived,
    SignalRejected,
    utcnow,
)

from ._continuation import run_stored_at
from ._record_bounds import MAX_REASON
from ._recorder import RunRecorder

log = logging.getLogger("natflow.worker")

# How long a signal sealed with a key no worker holds waits for one that does.
KEY_PATIENCE: Final = timedelta(hours=1)


class SignalIntake:
    """Takes one run's new signals into its history and delivers them to the workflow."""

    __slots__ = ("_created_at", "_rec", "key_patience_ends")

    def __init__(self, rec: RunRecorder) -> None:
        self._rec = rec
        self._created_at: datetime | None = None  # when the server stored run_started
        # A signal sealed with a key this worker lacks: when it stops waiting for a worker
        # that holds the key (set as the run is handed back for it).
        self.key_patience_ends: datetime | None = None

    async def move(self) -> bool:
        """Move the run's new signals into history, in order; True if any arrived."""
        moved = False
        rec = self._rec
        state = rec.state
        for msg in await pending_signals(rec.conn, rec.run_id, state.signal_cursor):
            seq = sequence(msg)
            try:
                signal = parse(msg, seq)
                await self._check_not_before_run(msg, seq, signal.name)
            except BadSignal as bad:
                await self._reject(seq, bad.name, bad.reason)
                continue
            state.signal_cursor = seq
            if signal.name == CHILD:
                await self._record_child(seq, signal.payload)
                moved = True
                continue
            if signal.name in (PAUSE, RESUME):
                await self._pause_or_resume(seq, signal.name, signal.payload)
                moved = True
                continue
            if signal.name in CONTROL:
                cancel = await rec.append(
                    CancelRequested(
                        id=rec.next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        reason=cancel_reason(signal.payload),
                        terminate=signal.name == TERMINATE,
                    )
                )
                assert isinstance(cancel, CancelRequested)
                state.deliver(cancel)
                await rec.flush()
                moved = True
                continue
            if signal.signal_id and state.knows_signal(signal.signal_id):
                continue  # a duplicate older than the stream's dedupe window
            try:
                # opened here (sealed again, with the current key, by the append)
                payload = await self._open(signal.payload, signal.name)
            except (MissingKey, WrongKey) as exc:
                # A worker with the right key takes the run later (the run is handed back),
                # but not for ever: one forged body, which anyone may send, stalled the run
                # for good. Past a while, no worker had the key: rejected, the run goes on.
                waited = utcnow() - stored_at(msg)
                if waited < KEY_PATIENCE:
                    self.key_patience_ends = stored_at(msg) + KEY_PATIENCE
                    raise
                await self._reject(
                    seq,
                    signal.name,
                    f"{exc}; no worker that could open it took the run within "
                    f"{KEY_PATIENCE} of it being sent",
                )
                continue
            except UnreadableValue as exc:  # looks like natflow's, is not: anyone may send
                await self._reject(seq, signal.name, str(exc))
                continue
            try:
                event = await rec.append(
                    SignalReceived(
                        id=rec.next_id(),
                        at=utcnow(),
                        signal_seq=seq,
                        name=signal.name,
                        payload=msgspec.Raw(payload),
                        signal_id=signal.signal_id,
                    )
                )
            except PayloadTooLarge as big:  # the stream took it; history cannot
                await self._reject_too_large(seq, signal.name, big)
                continue
            assert isinstance(event, SignalReceived)
            SIGNALS_DELIVERED.labels(rec.workflow_name).inc()
            state.deliver(event)
            await rec.flush()  # what the signal made the workflow do comes next
            moved = True
        return moved

    async def _open(self, payload: bytes, name: str) -> bytes:
        conn = self._rec.conn
        what = f"signal {name!r} to run {self._rec.run_id!r}"
        return open_sealed(conn.codec, await load_value(conn, payload, what), what)

    async def _record_child(self, seq: int, payload: bytes) -> None:
        """Record a ``$child`` signal (a child's outcome, sent by the engine) once."""
        rec = self._rec
        try:
            outcome = decode_child_outcome(payload)
        except UNDECODABLE as exc:  # not the engine's: anyone may publish a subject
            await self._reject(seq, CHILD, f"not a child run's outcome: {exc}")
            return
        command = rec.state.open_child(outcome.child_run_id)
        if command is None:  # a duplicate, or a child this run does not know
            log.info("run %s: outcome of child %s ignored", rec.run_id, outcome.child_run_id)
            return
        event: ChildCompleted | ChildFailed
        if outcome.status == "completed":
            try:
                result = await self._open(bytes(outcome.result), command.name)
            except UnreadableValue as exc:
                await self._reject(seq, CHILD, f"not a child run's outcome: {exc}")
                return
            event = ChildCompleted(
                id=rec.next_id(),
                at=utcnow(),
                seq=command.seq,
                name=command.name,
                child_run_id=command.child_run_id,
                result=msgspec.Raw(result),
                signal_seq=seq,
            )
        else:
            event = ChildFailed(
                id=rec.next_id(),
                at=utcnow(),
                seq=command.seq,
                name=command.name,
                child_run_id=command.child_run_id,
                status=outcome.status,
                error=outcome.error,
                reason=outcome.reason,
                signal_seq=seq,
            )
        recorded = await rec.append(event)
        assert isinstance(recorded, ChildCompleted | ChildFailed)
        rec.state.deliver(recorded)
        await rec.flush()

    async def _reject(self, seq: int, name: str, reason: str) -> None:
        """Record that the signal at ``seq`` reaches no workflow, and why; move past it."""
        rec = self._rec
        await rec.append(
            SignalRejected(
                id=rec.next_id(),
                at=utcnow(),
                signal_seq=seq,
                name=name,
                reason=reason[:MAX_REASON],
            )
        )
        SIGNALS_REJECTED.labels("worker").inc()
        rec.state.signal_cursor = seq

    async def _reject_too_large(self, seq: int, name: str, big: PayloadTooLarge) -> None:
        rec = self._rec
        reason = (
            f"too large to move into history ({big.size} bytes as an event, over the "
            f"server's max payload of {rec.conn.max_payload}); send a reference instead"
        )
        quarantined("signal_too_large", f"signal #{seq} of run {rec.run_id}", reason, logger=log)
        await self._reject(seq, name, reason)

    async def _pause_or_resume(self, seq: int, name: str, payload: bytes) -> None:
        rec = self._rec
        pause = name == PAUSE
        if pause == rec.state.paused:
            return  # paused (or running) already: nothing changes
        event: RunPaused | RunResumed = (
            RunPaused(
                id=rec.next_id(),
                at=utcnow(),
                signal_seq=seq,
                reason=cancel_reason(payload),
            )
            if pause
            else RunResumed(id=rec.next_id(), at=utcnow(), signal_seq=seq)
        )
        await rec.append(event)
        rec.state.paused = pause
        log.info("run %s %s", rec.run_id, "paused" if pause else "resumed", extra=rec.fields())

    async def _check_not_before_run(self, msg: Any, seq: int, name: str) -> None:
        """A signal stored before the run existed was dead-lettered ("no run has this id")
        and must not reach a run created under that id later. Both times are the server's."""
        if self._created_at is None:
            rec = self._rec
            self._created_at = await run_stored_at(rec.conn, rec.run_id, rec.state.start)
        if self._created_at is not None and stored_at(msg) < self._created_at:
            raise BadSignal(seq, msg.subject, name, "sent before the run existed")
