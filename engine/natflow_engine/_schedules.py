"""Schedules: what they are, where they live, and what a fire does.

A schedule is one entry of the KV bucket ``natflow_schedules`` (key: the schedule id), a JSON
:class:`Schedule` holding both its definition (workflow, input, :class:`ScheduleSpec`) and its
state: the ``cursor`` (every fire time at or before it has been dealt with), the runs it
started that may still be open, fires buffered behind them, fires decided on but not yet
started (``pending``), and the recent outcomes. Every change is a revision-checked put, so
engine replicas, clients and the CLI never overwrite each other; the loser reads again.

:func:`plan` is the pure decision: given the entry, the time, and which of its runs have
closed, what to start, cancel, buffer, skip or record as missed. Each fire starts the run
``<schedule_id>-<fire time>`` (e.g. ``nightly-20261126T000000Z``), so a start repeated by a
second replica or after a crash finds the run already there and makes nothing new.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import msgspec

from ._connection import Connection, JetStreamError
from ._cron import FireTimes, fire_token, jitter_for
from ._durations import MAX_DURATION
from ._errors import InvalidInput, NatflowError
from ._kv import kv_delete, kv_entries, kv_get, kv_put, kv_stream
from ._names import check_token
from ._quarantine import quarantined
from ._registry import hashed_token, safe_identity
from ._streams import SCHEDULES_BUCKET
from ._undecodable import UNDECODABLE

log = logging.getLogger("natflow.schedules")

OVERLAP_POLICIES: Final = (
    "skip",
    "buffer_one",
    "buffer_all",
    "cancel_other",
    "terminate_other",
    "allow_all",
)
MAX_SCHEDULE_ID: Final = 100  # leaves room for the fire time in the run id
KEEP_RECENT: Final = 50
MISSED_SCAN_LIMIT: Final = 200_000  # missed fire times counted in one pass
MAX_BUFFERED: Final = 1000  # buffer_all: further fires are skipped
# Starts one pass decides at most (the next pass goes on): each is kept in the entry until
# it is made, and the entry, with the schedule's input, must stay within the server's max
# payload. An allow_all schedule caught up after hours of outage decided thousands at once,
# outgrew it, and never fired again.
MAX_STARTS_PER_PASS: Final = 200
# How late past its due time (plus the catch-up window) a pass may meet a fire and still
# start it: the engine's own delay, not an outage.
PASS_TOLERANCE: Final = timedelta(seconds=1)
# What the entry may hold besides the input, at most (recent and missed fires, the buffer,
# open runs, a pass's starts); an input must leave this much of the max payload.
STATE_ROOM: Final = 192 * 1024

Action = Literal["started", "skipped", "buffered", "missed", "triggered", "backfilled"]


class ScheduleSpec(msgspec.Struct, kw_only=True, omit_defaults=True):
    """When a schedule fires and what it does when its last run is still going."""

    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    jitter: float = 0.0
    overlap: str = "skip"
    catchup_window: float = 86400.0
    queue: str = "default"

    def fire_times(self) -> FireTimes:
        return FireTimes(cron=self.cron, every=self.every, timezone=self.timezone)


class ScheduleFire(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One fire and what became of it (``run_id`` is None when no run was started)."""

    fire_time: datetime
    action: str
    at: datetime
    run_id: str | None = None


class Schedule(msgspec.Struct, kw_only=True):
    """A schedule as stored: definition and state (see the module docstring)."""

    v: int = 1
    schedule_id: str
    workflow: str
    input: msgspec.Raw = msgspec.Raw(b"null")
    spec: ScheduleSpec
    paused: bool = False
    note: str | None = None
    created_at: datetime
    updated_at: datetime
    cursor: datetime
    open_runs: list[str] = []
    buffered: list[datetime] = []
    pending: list[ScheduleFire] = []
    recent: list[ScheduleFire] = []
    missed: list[datetime] = []
    missed_count: int = 0


class ScheduleInfo(msgspec.Struct, kw_only=True):
    """What ``client.schedules.describe`` and ``list`` return.

    Attributes:
        schedule_id: The schedule's id.
        workflow: The workflow each fire starts.
        spec: Cron or interval, time zone, jitter, overlap policy, catch-up window, queue.
        paused: True while no fire starts a run.
        next_fire_times: The next few fire times (UTC, jitter not included).
        recent_runs: The newest fires first: fire time, what happened, the run started.
        missed: Fire times (newest first) that fell outside the catch-up window.
    """

    schedule_id: str
    workflow: str
    spec: ScheduleSpec
    paused: bool
    next_fire_times: list[datetime]
    recent_runs: list[ScheduleFire]
    missed: list[datetime]
    note: str | None = None
    input: Any = None
    buffered: list[datetime] = []
    missed_count: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Schedule)


def declared_schedule_id(workflow: str) -> str:
    """The id of the schedule ``@workflow(cron=/every=)`` declares: the name where it is a
    token that fits, else its token-safe form and a hash of the name. The safe form alone
    gave ``reports.daily`` and ``reports-daily`` one schedule, each worker taking it over (and
    a worker allowed one of them the other's)."""
    return hashed_token(workflow, MAX_SCHEDULE_ID)


def legacy_schedule_id(workflow: str) -> str:
    """What :func:`declared_schedule_id` was before it hashed names that are not tokens."""
    return safe_identity(workflow)[:MAX_SCHEDULE_ID]


def check_schedule_id(schedule_id: object) -> str:
    check_token("schedule id", schedule_id)
    assert isinstance(schedule_id, str)
    if len(schedule_id) > MAX_SCHEDULE_ID:
        raise InvalidInput(f"schedule id {schedule_id!r} is longer than {MAX_SCHEDULE_ID}")
    return schedule_id


def check_spec(spec: ScheduleSpec) -> ScheduleSpec:
    """``spec`` if it is sound; :class:`InvalidInput` naming what is not."""
    _checked(ScheduleSpec, "schedule spec", spec)  # types first: a struct built in code
    fire_times = spec.fire_times()  # cron, every and time zone
    if spec.overlap not in OVERLAP_POLICIES:
        raise InvalidInput(
            f"unknown overlap policy {spec.overlap!r}: use one of {', '.join(OVERLAP_POLICIES)}"
        )
    if not 0 <= spec.jitter < 86400:
        raise InvalidInput(f"jitter must be between 0 and a day, not {spec.jitter!r}")
    if not 0 <= spec.catchup_window <= MAX_DURATION:
        raise InvalidInput(
            f"catchup_window must be between 0 and a hundred years, not {spec.catchup_window!r}"
        )
    check_token("queue name", spec.queue)
    try:
        next(fire_times.after(datetime.now(UTC)))
    except (OverflowError, ValueError) as exc:  # past what a datetime holds
        raise InvalidInput(f"the schedule's next fire time cannot be computed ({exc})") from None
    return spec


def _checked(kind: type[msgspec.Struct], what: str, value: msgspec.Struct) -> bytes:
    """``value`` encoded, if it decodes back as ``kind``: msgspec checks no types of a struct
    built in code, so a wrong one (``paused="yes"``) would be stored, then refused by every
    reader. :class:`InvalidInput` names the field."""
    try:
        data = _encoder.encode(value)
        msgspec.json.decode(data, type=kind)
    except (TypeError, ValueError, msgspec.EncodeError, msgspec.ValidationError) as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    return data


def fire_run_id(schedule_id: str, fire: datetime) -> str:
    return f"{schedule_id}-{fire_token(fire)}"


def trigger_run_id(schedule_id: str, at: datetime) -> str:
    """A run id for ``trigger`` (fire now): the time to the millisecond, marked ``t``, and
    four random hex digits: two triggers in one millisecond (two operators, a loop) are two
    runs, not one run handed to both."""
    when = f"{at.astimezone(UTC):%Y%m%dT%H%M%S}{at.microsecond // 1000:03d}"
    return f"{schedule_id}-{when}Zt{secrets.token_hex(2)}"


def info_of(schedule: Schedule, now: datetime, count: int = 5) -> ScheduleInfo:
    try:
        next_times = [] if schedule.paused else schedule.spec.fire_times().next(now, count)
    except (NatflowError, OverflowError, ValueError):  # a spec stored by hand: none computed
        next_times = []
    return ScheduleInfo(
        schedule_id=schedule.schedule_id,
        workflow=schedule.workflow,
        spec=schedule.spec,
        paused=schedule.paused,
        note=schedule.note,
        input=msgspec.json.decode(schedule.input),
        next_fire_times=next_times,
        recent_runs=list(reversed(schedule.recent)),
        missed=list(reversed(schedule.missed)),
        buffered=list(schedule.buffered),
        missed_count=schedule.missed_count,
        created_at=schedule.created_at,
        updated_at=schedule.updated_at,
    )


# -- the decision --------------------------------------------------------------------------


class Plan(msgspec.Struct, kw_only=True):
    schedule: Schedule
    cancel: list[str] = []  # runs to cancel (or terminate) before the new one starts
    changed: bool = False


def due_at(schedule: Schedule, fire: datetime) -> datetime:
    jitter = jitter_for(schedule.schedule_id, fire, schedule.spec.jitter)
    return fire + timedelta(seconds=jitter)


def next_due(schedule: Schedule) -> datetime | None:
    """When the schedule next needs attention by the time alone (None while paused)."""
    if schedule.paused:
        return None
    fire = next(schedule.spec.fire_times().after(schedule.cursor))
    return due_at(schedule, fire)


def plan(schedule: Schedule, now: datetime, closed: set[str]) -> Plan:
    """Deal with every fire due by ``now``, oldest first; see the module docstring."""
    s = msgspec.structs.replace(
        schedule,
        open_runs=[r for r in schedule.open_runs if r not in closed],
        buffered=list(schedule.buffered),
        pending=list(schedule.pending),
        recent=list(schedule.recent),
        missed=list(schedule.missed),
    )
    result = Plan(schedule=s, changed=s.open_runs != schedule.open_runs)
    if s.paused:
        return result
    # Lateness counts from when a fire was due (its jitter added), and a pass may come a
    # moment after that: measured from the bare fire time, a jitter over the window (or a
    # window of 0) recorded fires the engine met on time as missed.
    window = timedelta(seconds=s.spec.catchup_window) + PASS_TOLERANCE
    _skip_missed(s, now - window, now, result)
    _start_buffered(s, now, result)  # a fire that waited goes before newer ones
    for fire in s.spec.fire_times().after(s.cursor):
        if due_at(s, fire) > now or len(s.pending) >= MAX_STARTS_PER_PASS:
            break
        if now - due_at(s, fire) > window:  # came due past the window while this pass ran
            _record(s, fire, "missed", now)
            s.missed.append(fire)
            s.missed_count += 1
        else:
            _fire(s, fire, now, result)
        s.cursor = fire
        result.changed = True
    _start_buffered(s, now, result)
    del s.missed[:-KEEP_RECENT]
    return result


def _start_buffered(s: Schedule, now: datetime, result: Plan) -> None:
    if s.buffered and not s.open_runs:
        _start(s, s.buffered.pop(0), now, "started")
        result.changed = True


def _skip_missed(s: Schedule, horizon: datetime, now: datetime, result: Plan) -> None:
    """Fires older than the catch-up window: counted, the newest ``KEEP_RECENT`` kept.

    One pass counts at most ``MISSED_SCAN_LIMIT`` of them (the next pass goes on), so an
    outage of weeks on a schedule firing every second costs no more than a few passes.
    """
    kept: deque[datetime] = deque(maxlen=KEEP_RECENT)
    counted = 0
    for fire in s.spec.fire_times().after(s.cursor):
        if due_at(s, fire) >= horizon or counted == MISSED_SCAN_LIMIT:
            break
        kept.append(fire)
        counted += 1
        s.cursor = fire
    s.missed_count += counted
    for fire in kept:
        s.missed.append(fire)
        _record(s, fire, "missed", now)
    result.changed = result.changed or counted > 0


def _fire(s: Schedule, fire: datetime, now: datetime, result: Plan) -> None:
    policy = s.spec.overlap
    if not s.open_runs or policy == "allow_all":
        _start(s, fire, now, "started")
    elif policy in ("cancel_other", "terminate_other"):
        for run_id in s.open_runs:
            if not _unstart(s, run_id, now):
                result.cancel.append(run_id)
        s.open_runs = []
        _start(s, fire, now, "started")
    elif len(s.buffered) >= MAX_BUFFERED:
        _record(s, fire, "skipped", now)
    elif policy == "buffer_all" or (policy == "buffer_one" and not s.buffered):
        s.buffered.append(fire)
        _record(s, fire, "buffered", now)
    else:  # skip, or buffer_one with one already waiting
        _record(s, fire, "skipped", now)


def _unstart(s: Schedule, run_id: str, now: datetime) -> bool:
    """Take back a start decided in this same pass (several fires caught up at once): that
    run was never started, so there is nothing to cancel; its fire counts as skipped."""
    if not any(p.run_id == run_id and p.at == now for p in s.pending):
        return False
    s.pending = [p for p in s.pending if p.run_id != run_id]
    s.recent = [
        msgspec.structs.replace(r, action="skipped", run_id=None) if r.run_id == run_id else r
        for r in s.recent
    ]
    return True


def _start(s: Schedule, fire: datetime, now: datetime, action: Action) -> None:
    run_id = fire_run_id(s.schedule_id, fire)
    if s.spec.overlap != "allow_all":  # allow_all never asks, so keeps no list to grow
        s.open_runs.append(run_id)
    s.pending.append(ScheduleFire(fire_time=fire, action=action, at=now, run_id=run_id))
    _record(s, fire, action, now, run_id)


def _record(
    s: Schedule, fire: datetime, action: Action, now: datetime, run_id: str | None = None
) -> None:
    s.recent.append(ScheduleFire(fire_time=fire, action=action, at=now, run_id=run_id))
    del s.recent[:-KEEP_RECENT]


# -- the store -----------------------------------------------------------------------------


class ScheduleConflict(Exception):
    """The entry changed since it was read (another writer won); read it again."""


def encode_schedule(schedule: Schedule) -> bytes:
    return _encoder.encode(schedule)


class UnreadableSchedule(NatflowError):
    """A stored schedule this natflow cannot read (written by hand, or by a newer natflow)."""

    def __init__(self, schedule_id: str, reason: str) -> None:
        super().__init__(
            f"schedule {schedule_id!r} is stored in a form this natflow cannot read ({reason}); "
            f"`natflow schedules delete {schedule_id}` removes it"
        )


def read_schedule(schedule_id: str, data: bytes) -> Schedule:
    """The stored schedule; :class:`UnreadableSchedule` if it does not decode."""
    try:
        return _decoder.decode(data)
    except UNDECODABLE as exc:
        raise UnreadableSchedule(schedule_id, str(exc)) from None


async def get_schedule(conn: Connection, schedule_id: str) -> tuple[Schedule, int] | None:
    found = await kv_get(conn, SCHEDULES_BUCKET, schedule_id)
    return None if found is None else (read_schedule(schedule_id, found[0]), found[1])


async def put_schedule(conn: Connection, schedule: Schedule, revision: int) -> int:
    """Write ``schedule`` if its entry is still at ``revision`` (0: new, or deleted)."""
    try:
        return await kv_put(
            conn,
            SCHEDULES_BUCKET,
            schedule.schedule_id,
            _checked(Schedule, f"schedule {schedule.schedule_id!r}", schedule),
            revision=revision,
        )
    except JetStreamError as exc:
        if exc.wrong_last_sequence:
            raise ScheduleConflict(schedule.schedule_id) from None
        raise


async def delete_schedule(conn: Connection, schedule_id: str) -> None:
    await kv_delete(conn, SCHEDULES_BUCKET, schedule_id)


async def list_schedules(conn: Connection) -> list[tuple[Schedule, int]]:
    """Every schedule natflow can read, by id, with its revision (one it cannot is logged
    once and left out: ``describe`` of it says why)."""
    found = []
    for msg in await kv_entries(conn, SCHEDULES_BUCKET):
        schedule_id = (msg.headers or {}).get("Nats-Subject", "").rpartition(".")[2]
        try:
            schedule = read_schedule(schedule_id, msg.data)
        except UnreadableSchedule as exc:
            quarantined("kv_schedules", schedule_id, str(exc), logger=log)
            continue
        found.append((schedule, int((msg.headers or {})["Nats-Sequence"])))
    return sorted(found, key=lambda pair: pair[0].schedule_id)


async def change_schedule(
    conn: Connection, schedule_id: str, change: Any, *, attempts: int = 10
) -> Schedule:
    """Read, ``change(schedule)`` (returns the new one), write back; again on a conflict."""
    for _ in range(attempts):
        found = await get_schedule(conn, schedule_id)
        if found is None:
            raise NatflowError(f"no schedule {schedule_id!r}")
        new: Schedule = change(found[0])
        try:
            await put_schedule(conn, new, found[1])
        except ScheduleConflict:
            continue
        return new
    raise NatflowError(f"schedule {schedule_id!r} kept changing; try again")


async def create_schedule(conn: Connection, schedule: Schedule) -> bool:
    """Store a new schedule; False if one of that id exists (a deleted one is replaced)."""
    msg = await conn.request(
        f"{conn.api}.DIRECT.GET.{kv_stream(SCHEDULES_BUCKET)}"
        f".$KV.{SCHEDULES_BUCKET}.{schedule.schedule_id}",
        b"",
    )
    headers = msg.headers or {}
    if headers.get("Status") == "404":
        revision = 0
    elif headers.get("KV-Operation") in ("DEL", "PURGE"):
        revision = int(headers["Nats-Sequence"])
    else:
        return False
    try:
        await put_schedule(conn, schedule, revision)
    except ScheduleConflict:
        return False
    return True
