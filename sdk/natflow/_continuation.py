"""Continue-as-new: a run goes on with a fresh stretch of history and a new input.

``ctx.continue_as_new(input)`` raises :class:`ContinueAsNew` through the workflow's code.
When the driver sees the workflow end with it, it applies the open children's
``parent_close`` policy and publishes one ``run_continued`` event with ``Nats-Rollup: sub``
and the run's expected last sequence: JetStream keeps that event and drops every earlier one
of the run's subject in one step, and the append is fenced like any other (a worker that lost
the run cannot continue it). The run keeps its id, so the handle a user holds, its signals,
lease, index entry and children's parent link stay as they were.

What crosses from one stretch to the next is in the ``run_continued`` event (see
:class:`natflow_engine.events.RunContinued`): the new input; the last command position used
(the new stretch numbers its commands after it, so a timer key ``<run_id>.<seq>`` or a derived
child id ``<run_id>-c<seq>`` never meets an older stretch's); the signal cursor and the
signals already moved into history that the workflow had not taken (delivered first in the
new stretch: a signal sent during the switch is either in the old stretch's history, and
carried, or after the cursor, and moved in by the new stretch; never both).

Why a rollup of the same subject rather than a new run linked to the old: the switch is one
atomic, fenced write; nothing has to follow a chain of run ids (handles, signals, the run
index, children's ``parent``, leases all keep working unchanged), and the old stretch's
events are gone at once instead of waiting for retention.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
from natflow_engine import (
    Connection,
    InvalidInput,
    check_value_size,
    decode_value,
    encode_value,
    run_created_at,
)
from natflow_engine.events import RunContinued, RunStarted, SignalReceived, utcnow

if TYPE_CHECKING:
    from ._workflow import Workflow

# ``ctx.continue_as_new_suggested`` turns True once the current stretch has issued this many
# commands (steps, sleeps, signal waits, children; each records one to three events). A
# stretch this size replays in tens of milliseconds, well under the 100 ms a worker taking
# over a run may spend on it.
SUGGESTED_AFTER_COMMANDS: Final = 1_000
_SIGNAL_IDS_KEPT: Final = 1_000  # recent signal ids carried, so late duplicates stay known


class ContinueAsNew(BaseException):
    """Raised by ``ctx.continue_as_new``: the workflow ends this stretch of its history.

    A ``BaseException``, so an ``except Exception`` in the workflow does not swallow it.
    """

    def __init__(self, input_json: bytes) -> None:
        super().__init__("the workflow continues as new")
        self.input_json = input_json


class StretchState(Protocol):
    """What :func:`next_stretch` reads of a run's replay state (``_replay.WorkflowState``,
    whose module imports this one)."""

    @property
    def start(self) -> RunStarted: ...

    @property
    def last_seq_used(self) -> int: ...

    @property
    def signal_cursor(self) -> int: ...

    @property
    def paused(self) -> bool: ...

    def unconsumed_signals(self) -> list[SignalReceived]: ...

    def recent_signal_ids(self, limit: int) -> list[str]: ...


def new_input(workflow: Workflow, value: Any) -> bytes:
    """``value`` as the input of the workflow's next stretch; :class:`InvalidInput` naming
    the problem if the workflow could not take it (checked now, not in the next stretch)."""
    what = f"input of workflow {workflow.name!r} passed to ctx.continue_as_new"
    if not workflow.takes_input:
        if value is not None:
            raise InvalidInput(f"{what}: workflow {workflow.name!r} takes no input; pass None")
        return b"null"
    data = encode_value(what, value)
    decode_value(what, data, workflow.input_type)  # the next stretch must be able to read it
    return data


def stretch_of(start: RunStarted) -> int:
    """Which stretch a history whose first event is ``start`` is (1 before any continuation)."""
    return start.stretch if isinstance(start, RunContinued) else 1


def next_stretch(
    state: StretchState, run_id: str, input_json: bytes, event_id: str, events: int
) -> RunContinued:
    """The ``run_continued`` event that starts the stretch after ``state``'s."""
    start = state.start
    carried = sorted(state.unconsumed_signals(), key=lambda s: s.signal_seq)
    return RunContinued(
        id=event_id,
        at=utcnow(),
        workflow=start.workflow,
        queue=start.queue,
        input=msgspec.Raw(input_json),
        parent=start.parent,
        trigger=start.trigger,
        trace_context=start.trace_context,
        on_complete=start.on_complete,
        on_complete_queue=start.on_complete_queue,
        retention=start.retention,
        priority=start.priority,  # it lost its priority, and its turn to runs of none
        stretch=stretch_of(start) + 1,
        base_seq=state.last_seq_used,
        events_before=events,
        signal_cursor=state.signal_cursor,
        signals=[msgspec.structs.replace(s, id="") for s in carried],
        signal_ids=state.recent_signal_ids(_SIGNAL_IDS_KEPT),
        paused=state.paused,
        run_started_at=(start.run_started_at if isinstance(start, RunContinued) else start.at),
        reseeded=True,
        v=2,  # a reader of version 1 would replay the stretch with other random values
    )


async def run_stored_at(conn: Connection, run_id: str, start: RunStarted) -> datetime | None:
    """When the server stored the run's ``run_started`` (the first stretch's first event):
    signals stored before it were sent before the run existed. Carried by each
    ``run_continued``, whose own storage time is later than signals the run must take."""
    if isinstance(start, RunContinued) and start.run_stored_at is not None:
        return start.run_stored_at
    return await run_created_at(conn, run_id)  # a restart of a continued run: its own


def check_input_size(conn: Connection, run_id: str, input_json: bytes) -> None:
    """Refuse a new input over ``max_value_bytes`` (the run then fails, naming it)."""
    check_value_size(
        conn,
        f"input of run {run_id!r} passed to ctx.continue_as_new",
        len(input_json),
        to_seal=True,
    )


__all__ = [
    "SUGGESTED_AFTER_COMMANDS",
    "ContinueAsNew",
    "check_input_size",
    "new_input",
    "next_stretch",
    "run_stored_at",
    "stretch_of",
]
