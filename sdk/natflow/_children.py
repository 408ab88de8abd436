"""What a run sends its child runs: their starts, and its ``parent_close`` policy as it closes.

A child's outcome comes back as a ``$child`` signal (see ``_signal_intake``).
"""

from __future__ import annotations

import anyio
import msgspec
from natflow_engine import (
    CANCEL,
    TERMINATE,
    TRANSIENT,
    Connection,
    ErrorInfo,
    InvalidInput,
    NatflowError,
    PermissionDenied,
    Runs,
    error_info,
    one_error,
    send,
    start_declared,
)
from natflow_engine.events import ChildStarted

from ._commands import ChildCommand
from ._record_bounds import MAX_REASON
from ._replay import WorkflowState
from ._tracing import child_trace_context

_CHILD_STARTS_AT_ONCE = 64


async def start_children(
    conn: Connection, state: WorkflowState, children: list[ChildStarted]
) -> dict[int, ErrorInfo]:
    """Start the children these records declare; returns why each refused one was refused.

    Started before they are recorded: a start is idempotent on the child's id (derived from
    this run's id and the position), so a crash in between makes the replay start the same
    child again, which finds it and makes no second. Started together: a fan-out's starts are
    round trips that need not wait on each other.
    """
    limit = anyio.CapacityLimiter(_CHILD_STARTS_AT_ONCE)
    refused: dict[int, ErrorInfo] = {}

    async def start(event: ChildStarted) -> None:
        async with limit:
            try:
                await _start_child(conn, state, event)
            except (InvalidInput, NatflowError) as exc:
                if isinstance(exc, (PermissionDenied, *TRANSIENT)):
                    raise  # a deployment problem or the server away, not this child's: later
                refused[event.seq] = error_info(exc)  # e.g. its id is another's run

    with one_error():  # the worker branches on the error (transient: handed back)
        async with anyio.create_task_group() as tg:
            for child in children:
                tg.start_soon(start, child)
    return refused


async def _start_child(conn: Connection, state: WorkflowState, event: ChildStarted) -> None:
    command = state.command(event.seq)
    assert isinstance(command, ChildCommand)
    await start_declared(  # with the flow control the child's workflow declares
        Runs(conn),
        command.name,
        command.queue,
        command.input_json,
        command.child_run_id,
        child_of=state.run_id,
        trace_context=child_trace_context(state.run_id, state.start),
    )


async def close_children(conn: Connection, state: WorkflowState, reason: str) -> None:
    """Apply each open child's ``parent_close`` policy as this run closes."""
    for command in state.open_children():
        await _apply_policy(conn, state.run_id, command, f"parent {state.run_id} closed: {reason}")


async def stop_let_go_children(conn: Connection, state: WorkflowState) -> None:
    """Apply the ``parent_close`` policy to each open child the workflow stopped waiting for
    (the task awaiting it cancelled), as the parent goes on."""
    for command in state.take_children_to_stop():
        await _apply_policy(
            conn,
            state.run_id,
            command,
            f"parent {state.run_id} stopped waiting for it (its wait was cancelled)",
        )


async def _apply_policy(conn: Connection, run_id: str, command: ChildCommand, why: str) -> None:
    if command.parent_close == "abandon":
        return
    kind = TERMINATE if command.parent_close == "terminate" else CANCEL
    # One request id per parent: a cancel sent now and at the parent's close is one.
    await send(
        conn,
        command.child_run_id,
        kind,
        msgspec.json.encode(why[:MAX_REASON]),
        f"parent-{run_id}",
    )
