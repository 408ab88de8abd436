"""How a run's history ends: completed, failed, cancelled or terminated, continued as new,
or blocked (its code no longer matches its history)."""

from __future__ import annotations

import logging

import msgspec
from natflow_engine import (
    CANCEL,
    TERMINATE,
    ErrorInfo,
    InvalidInput,
    check_value_size,
    control_request,
    encode_value,
    error_info,
    pending_signals,
)
from natflow_engine.events import (
    RunBlocked,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunTerminated,
    utcnow,
)

from ._children import close_children
from ._continuation import ContinueAsNew, check_input_size, next_stretch, run_stored_at
from ._outcome import Outcome
from ._record_bounds import bounded
from ._recorder import Fenced, RunRecorder

log = logging.getLogger("natflow.worker")


async def finish(rec: RunRecorder) -> Outcome:
    """Record the end of a run whose workflow returned, raised, or was cancelled."""
    state = rec.state
    assert state.root is not None
    if state.terminated is not None:
        return await end(rec, RunTerminated, state.terminated)
    if state.root.cancelled():
        return await end(rec, RunCancelled, state.cancelled or "cancelled")
    exc = state.root.exception()
    if isinstance(exc, ContinueAsNew):
        if state.cancelled is not None:  # a cancellation that reached it wins
            return await end(rec, RunCancelled, state.cancelled)
        return await _continue_as_new(rec, exc)
    await close_children(rec.conn, state, "it ended")
    if exc is not None:
        return await fail(rec, error_info(exc))
    try:
        data = encode_value(f"result of workflow {rec.workflow_name!r}", state.root.result())
        check_value_size(rec.conn, f"result of run {rec.run_id!r}", len(data), to_seal=True)
    except InvalidInput as error:
        return await fail(rec, error_info(error))
    await rec.append(RunCompleted(id=rec.next_id(), at=utcnow(), result=msgspec.Raw(data)))
    return Outcome.COMPLETED


async def end(
    rec: RunRecorder, kind: type[RunCancelled] | type[RunTerminated], reason: str
) -> Outcome:
    """Record a cancelled or terminated run's end (its open children closed first)."""
    await close_children(rec.conn, rec.state, reason)
    await rec.append(kind(id=rec.next_id(), at=utcnow(), reason=reason))
    return Outcome.CANCELLED


async def fail(rec: RunRecorder, error: ErrorInfo) -> Outcome:
    await rec.append(RunFailed(id=rec.next_id(), at=utcnow(), error=bounded(error)))
    return Outcome.FAILED


async def _continue_as_new(rec: RunRecorder, request: ContinueAsNew) -> Outcome:
    """Start the run's next stretch of history (see ``_continuation``)."""
    await close_children(rec.conn, rec.state, "it continued as new")  # or failed, below
    try:
        check_input_size(rec.conn, rec.run_id, request.input_json)
    except InvalidInput as error:
        return await fail(rec, error_info(error))
    await rec.append_held()  # the old stretch's last step: counted in what the new one follows
    event = next_stretch(rec.state, rec.run_id, request.input_json, rec.next_id(), rec.count)
    stored_at = await run_stored_at(rec.conn, rec.run_id, rec.state.start)
    event = msgspec.structs.replace(event, run_stored_at=stored_at)
    await rec.append(event, rollup=True)
    log.info("run %s continued as new (stretch %d)", rec.run_id, event.stretch, extra=rec.fields())
    return Outcome.CONTINUED


async def end_blocked_if_asked(rec: RunRecorder) -> bool:
    """Terminate a run blocked by incompatible code that was asked to cancel or terminate
    since (True if it was): no workflow code runs, so none is needed. A held run would
    otherwise wait for compatible code to stop, which may never be deployed."""
    block = rec.state.block
    assert block is not None
    asked = [
        m
        for m in await pending_signals(rec.conn, rec.run_id, rec.state.signal_cursor)
        if control_request((m.headers or {}).get("Nats-Subject", m.subject)) in (CANCEL, TERMINATE)
    ]
    if not asked:
        return False
    try:
        await rec.append(
            RunTerminated(id=rec.next_id(), at=utcnow(), reason=f"stopped while blocked: {block}")
        )
    except Fenced:
        return False
    log.info("run %s: terminated while blocked", rec.run_id, extra=rec.fields())
    return True


async def record_block(rec: RunRecorder) -> None:
    """Record that the run's code diverged from its history (once: a repeat writes nothing)."""
    block = rec.state.block
    assert block is not None
    cause = rec.state.block_cause
    info = ErrorInfo(
        type="NonDeterminismError",
        message=str(block),
        traceback=error_info(cause).traceback if cause is not None else "",
    )
    last = rec.last_event
    if isinstance(last, RunBlocked) and last.error.message == info.message:
        return
    log.error("%s", block, extra=rec.fields())
    try:
        await rec.append(
            RunBlocked(id=rec.next_id(), at=utcnow(), position=block.position, error=info)
        )
    except Fenced:
        log.info("run %s changed while being blocked; it will be retried", rec.run_id)
