"""The history event schema: every change of a run's state, as tagged JSON.

Each history message holds one event, a JSON object such as::

    {"type":"step_completed","v":1,"id":"order-1:3","at":"2026-11-21T20:00:00.1Z",
     "seq":1,"name":"charge","occurrence":1,"attempt":1,"started_at":"...","result":{...}}

``type`` names the event. A run's events are stored on ``natflow.history.<run_id>.run`` (run-level
kinds, which the engine folds) and ``natflow.history.<run_id>.step`` (the rest); a run that
starts now has its start on ``natflow.history.<run_id>.start.<queue>.<workflow>``, where its
workers take it; see ``_streams``.
``v`` is the schema version, ``id`` is ``<run_id>:<n>`` where ``n`` is the event's position in
the run (1-based); it doubles as the ``Nats-Msg-Id`` so a retried append deduplicates.

Rules for changing this schema without breaking stored histories:

* a new field gets a default, so old events still decode;
* a tag is never renamed or reused; a removed event type keeps its class;
* a change an old reader cannot ignore bumps ``SCHEMA_VERSION``; readers accept every older one
  and refuse a newer one (:func:`decode_event`), which a newer natflow wrote: such an event
  is met like one that does not decode (the run is held as blocked, and says why).

Version 2: a ``run_completed`` may carry its last step's outcome (``last_step``); a
``run_continued`` with ``reseeded`` draws other random values in its stretch.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import msgspec

from ._errors import ErrorInfo
from ._undecodable import UNDECODABLE

SCHEMA_VERSION: Final = 2
NULL: Final = msgspec.Raw(b"null")


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    # The oldest schema version that reads the event right: 1 unless it uses what a later
    # version added (see the module docstring).
    v: int = 1
    id: str = ""
    at: datetime


class Trigger(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What started a run that no client started: a schedule's fire, or an event.

    ``kind`` is ``"schedule"`` (with ``schedule`` and the nominal ``fire_time``) or
    ``"event"`` (with the event's ``event`` name and its ``event_seq`` in ``NATFLOW_EVENTS``).
    """

    kind: str
    schedule: str | None = None
    fire_time: datetime | None = None
    event: str | None = None
    event_seq: int | None = None


class RunStarted(_Event, tag="run_started", kw_only=True, frozen=True):
    """A run was created; ``input`` is the workflow's input as JSON."""

    workflow: str
    queue: str
    input: msgspec.Raw = NULL
    parent: str | None = None
    not_before: datetime | None = None  # start_delay: no worker takes the run before this
    trigger: Trigger | None = None  # set when a schedule or an event started the run
    # The W3C trace context ({"traceparent": ..., "tracestate": ...}) of the span that
    # started the run, when the starter traced it: every worker parents its spans to it.
    trace_context: dict[str, str] | None = None
    on_complete: str | None = None  # a workflow started once with the run's RunOutcome
    on_complete_queue: str | None = None  # its queue (None: "default")
    retention: float | None = None  # seconds the closed run is kept (None: the engine's)
    restarted_from: str | None = None  # the run this one restarts (its seed follows)
    on_complete_of: str | None = None  # the closed run whose RunOutcome is this run's input
    # Flow control (README "Flow control"): the rate limit that delayed the start to
    # ``not_before``, and the debounce cell whose latest input the run takes when it begins.
    rate_limited: str | None = None
    debounce: str | None = None
    # Orders the run among those waiting for a slot of a concurrency limit (higher first);
    # None: the workflow's declared default.
    priority: int | None = None


class RunContinued(RunStarted, tag="run_continued", kw_only=True, frozen=True):
    """``ctx.continue_as_new(input)``: the run goes on with a fresh stretch of history.

    Published with ``Nats-Rollup: sub`` (and the run's expected last sequence, so it is
    fenced like any append): JetStream keeps this event and drops every earlier one of the
    run's subject in one step. It carries what ``run_started`` carries (``input`` is the new
    input; ``restarted_from`` and ``not_before`` are never set) and what the new stretch needs
    from the old: its ``stretch`` number (the first continuation makes stretch 2), the last
    command position used (``base_seq``: the new stretch numbers its commands after it, so
    timer keys and derived child ids never meet an older stretch's), how many events came
    before (``events_before``: event ids go on from there), the signal cursor, signals moved
    into history that the workflow had not taken yet (``signals``, delivered first), recent
    signal ids (late duplicates stay recognised), whether the run was paused, and when the
    run itself started (``run_started_at``; ``run_stored_at``: the server's time of it).
    """

    stretch: int = 2
    base_seq: int = 0
    events_before: int = 0
    signal_cursor: int = 0
    signals: list[SignalReceived] = msgspec.field(default_factory=list)
    signal_ids: list[str] = msgspec.field(default_factory=list)
    paused: bool = False
    run_started_at: datetime | None = None
    # When the server stored the run's run_started (signals stored before it are refused).
    run_stored_at: datetime | None = None
    # ctx.random() and ctx.uuid4() of this stretch are seeded by the run id and the stretch
    # (every stretch had the same values: an idempotency key drawn in each was one key);
    # False in a stretch written before that, which replays with the run id's seed alone.
    reseeded: bool = False


class RunClaimed(_Event, tag="run_claimed", kw_only=True, frozen=True):
    """A worker took the run; later appends by any earlier holder are fenced off."""

    worker: str
    delivery: int = 1


class RunReleased(_Event, tag="run_released", kw_only=True, frozen=True):
    """``worker`` let the run go before its steps ended, on purpose (it was stopping, past
    its grace): the next holder runs them again. Not a death: a holder that released the
    run never counts towards holding it as poisoned."""

    worker: str
    reason: str = ""


class RunSuspended(_Event, tag="run_suspended", kw_only=True, frozen=True):
    """The run waits again, and nothing its worker recorded says so: it took the run for
    something that did not end the wait (a signal of another name, a resume, a child's outcome
    beside a sleep, a takeover). For the run index, whose last word was "running": what the
    run waits for (``status`` sleeping or waiting, ``current``, ``due_at``)."""

    status: str
    current: str
    due_at: datetime | None = None


class StepStarted(_Event, tag="step_started", kw_only=True, frozen=True):
    """A step has been running for a while (written only for slow steps, for visibility)."""

    seq: int
    name: str
    occurrence: int
    attempt: int = 1
    # Set when the step waits for a slot of a rate limit (named here) until that time.
    rate_limited_until: datetime | None = None
    rate_limit: str | None = None
    # When its body began (``at`` is when this was written, a while later); None in an event
    # written before this field, or for a step still waiting for its rate.
    started_at: datetime | None = None


class StepCompleted(_Event, tag="step_completed", kw_only=True, frozen=True):
    """A step returned; ``result`` is what every replay returns in its place."""

    seq: int
    name: str
    occurrence: int
    attempt: int = 1
    started_at: datetime
    result: msgspec.Raw = NULL


class StepFailed(_Event, tag="step_failed", kw_only=True, frozen=True):
    """A step raised; replays raise the recorded error as ``StepError``."""

    seq: int
    name: str
    occurrence: int
    attempt: int = 1
    started_at: datetime
    error: ErrorInfo


class StepRetrying(_Event, tag="step_retrying", kw_only=True, frozen=True):
    """Attempt ``attempt`` of a step failed; the next one is due at ``retry_at``.

    The wait is a durable timer (key ``<run_id>.<seq>`` like a sleep's): the run holds no
    worker meanwhile, and a ``timer_fired`` of the same ``seq`` starts the next attempt.
    """

    seq: int
    name: str
    occurrence: int
    attempt: int
    started_at: datetime
    error: ErrorInfo
    retry_at: datetime


class TimerScheduled(_Event, tag="timer_scheduled", kw_only=True, frozen=True):
    """``ctx.sleep``: the run sleeps until ``due_at``; no worker holds it meanwhile."""

    seq: int
    name: str
    due_at: datetime


class SignalWaited(_Event, tag="signal_waited", kw_only=True, frozen=True):
    """``ctx.wait_for_signal`` found no signal of that name and waits (until ``timeout_at``)."""

    seq: int
    name: str
    timeout_at: datetime | None = None


class TimerFired(_Event, tag="timer_fired", kw_only=True, frozen=True):
    """The timer of command ``seq`` (a sleep, a signal wait's timeout, a step's retry) came due."""

    seq: int
    name: str


class SignalReceived(_Event, tag="signal_received", kw_only=True, frozen=True):
    """A signal moved from ``NATFLOW_SIGNALS`` (stream sequence ``signal_seq``) into history."""

    signal_seq: int
    name: str
    payload: msgspec.Raw = NULL
    signal_id: str | None = None


class SignalRejected(_Event, tag="signal_rejected", kw_only=True, frozen=True):
    """A signal addressed to this run that could not be delivered, and why."""

    signal_seq: int
    name: str
    reason: str


class ChildStarted(_Event, tag="child_started", kw_only=True, frozen=True):
    """``ctx.child``: command ``seq`` starts run ``child_run_id`` of workflow ``name``.

    Recorded before the child is started; the start is idempotent on the child's id, so a
    replay or a crash of the parent never makes a second child. ``parent_close`` says what
    happens to the child if the parent closes first: ``cancel``, ``terminate`` or ``abandon``.
    """

    seq: int
    name: str
    child_run_id: str
    queue: str
    parent_close: str = "cancel"


class ChildCompleted(_Event, tag="child_completed", kw_only=True, frozen=True):
    """The child of command ``seq`` completed; ``result`` is its result."""

    seq: int
    name: str
    child_run_id: str
    result: msgspec.Raw = NULL
    signal_seq: int = 0  # the ``$child`` signal that brought it (the run's signal cursor)


class ChildFailed(_Event, tag="child_failed", kw_only=True, frozen=True):
    """The child of command ``seq`` ended without a result: ``status`` is ``failed`` (with
    ``error``), ``cancelled`` or ``terminated`` (with ``reason``)."""

    seq: int
    name: str
    child_run_id: str
    status: str
    error: ErrorInfo | None = None
    reason: str | None = None
    signal_seq: int = 0  # the ``$child`` signal that brought it (the run's signal cursor)


class PatchMarked(_Event, tag="patch_marked", kw_only=True, frozen=True):
    """``ctx.patched(change_id)`` returned True for this run."""

    change_id: str


class RunBlocked(_Event, tag="run_blocked", kw_only=True, frozen=True):
    """Replay diverged from history; the run waits for compatible code."""

    position: int
    error: ErrorInfo


class CancelRequested(_Event, tag="cancel_requested", kw_only=True, frozen=True):
    """``client.cancel`` (or ``terminate``) reached the run, moved in like a signal."""

    signal_seq: int
    reason: str | None = None
    terminate: bool = False


class RunPaused(_Event, tag="run_paused", kw_only=True, frozen=True):
    """``client.pause`` reached the run (moved in like a signal): no step, child or timer of
    the run starts until it is resumed; a step already running finishes and is recorded."""

    signal_seq: int
    reason: str | None = None


class RunResumed(_Event, tag="run_resumed", kw_only=True, frozen=True):
    """``client.resume`` reached the run: held steps start and timers due meanwhile fire."""

    signal_seq: int


class RestartSeeded(_Event, tag="restart_seeded", kw_only=True, frozen=True):
    """The outcomes copied from ``source`` end here: the restarted run may start.

    Steps before command ``from_seq`` (step ``step``, occurrence ``occurrence``) were copied
    and are not run again; that step and every later one run with the code now deployed.
    """

    source: str
    from_seq: int
    step: str
    occurrence: int
    copied: int


class RunRestarted(_Event, tag="run_restarted", kw_only=True, frozen=True):
    """Appended to a closed run when it was restarted: the new run's id."""

    restarted_as: str
    step: str
    occurrence: int


class RunCancelled(_Event, tag="run_cancelled", kw_only=True, frozen=True):
    """The workflow ended by its cancellation (its cleanup, if any, has run)."""

    reason: str | None = None


class RunTerminated(_Event, tag="run_terminated", kw_only=True, frozen=True):
    """The run was stopped at once; no workflow code ran after the request."""

    reason: str | None = None


class RunCompleted(_Event, tag="run_completed", kw_only=True, frozen=True):
    """The workflow returned ``result``.

    ``last_step``: the outcome of the step the workflow returned right after, recorded in
    the same message (one append where there were two; written with ``v`` 2). Its id is the
    position before this event's. Readers see it as a ``step_completed`` of its own just
    before this event (:func:`unpacked`); a natflow older than this field ignores it and
    would replay such a run as diverged.
    """

    result: msgspec.Raw = NULL
    last_step: StepCompleted | None = None


class RunFailed(_Event, tag="run_failed", kw_only=True, frozen=True):
    error: ErrorInfo


Event = (
    RunStarted
    | RunContinued
    | RunClaimed
    | RunReleased
    | RunSuspended
    | StepStarted
    | StepCompleted
    | StepFailed
    | StepRetrying
    | TimerScheduled
    | SignalWaited
    | TimerFired
    | SignalReceived
    | SignalRejected
    | ChildStarted
    | ChildCompleted
    | ChildFailed
    | PatchMarked
    | RunBlocked
    | CancelRequested
    | RunPaused
    | RunResumed
    | RestartSeeded
    | RunRestarted
    | RunCancelled
    | RunTerminated
    | RunCompleted
    | RunFailed
)

TERMINAL_EVENTS: Final = (RunCompleted, RunFailed, RunCancelled, RunTerminated)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """One event; an event of a newer schema version than this code's raises
    ``msgspec.ValidationError`` (one of ``UNDECODABLE``), as an unreadable one does: decoded,
    what it means that this code does not know would be silently dropped."""
    event: Event = _decoder.decode(data)
    if event.v > SCHEMA_VERSION:
        raise msgspec.ValidationError(
            f"a {event.__struct_config__.tag} event of schema version {event.v}, written by a "
            f"newer natflow (this one reads up to {SCHEMA_VERSION}): upgrade this process"
        )
    return event


def events_before(first: Event) -> int:
    """How many events the run recorded before the stretch ``first`` begins (event ids,
    which are positions, go on from there)."""
    return first.events_before if isinstance(first, RunContinued) else 0


def unpacked(events: list[Event]) -> list[Event]:
    """The events as the run recorded them, one per position: a ``run_completed`` that carries
    its last step's outcome becomes that ``step_completed`` followed by itself without it."""
    # Only a run's end carries one, and only a restart's note follows an end: look back
    # from the last event to the first that is not such a note.
    at = len(events) - 1
    while at > 0 and type(events[at]) is RunRestarted:
        at -= 1
    end = events[at] if events else None
    if type(end) is not RunCompleted or end.last_step is None:
        return events
    plain = msgspec.structs.replace(end, last_step=None, v=1)
    return [*events[:at], end.last_step, plain, *events[at + 1 :]]


class _Kind(msgspec.Struct):
    type: str = ""


_kind_decoder = msgspec.json.Decoder(_Kind)


def event_kind(data: bytes) -> str:
    """The ``type`` of an encoded event, without decoding the rest ("" if unreadable)."""
    try:
        return _kind_decoder.decode(data).type
    except UNDECODABLE:
        return ""
