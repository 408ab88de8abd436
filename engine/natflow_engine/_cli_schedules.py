"""CLI commands for triggers: ``natflow schedules ...`` and ``natflow events ...``."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import Any

import msgspec

from ._cli_bind import Command, Handler, Opener, bind
from ._cli_format import read_json_argument, table
from ._cli_types import positive_int, seconds
from ._connection import Connection
from ._durations import to_seconds
from ._errors import InvalidInput
from ._human import when
from ._schedule_ops import Schedules
from ._schedules import OVERLAP_POLICIES, ScheduleInfo, ScheduleSpec
from ._triggers import declarations, emit, recent_events, undeclare
from .events import Trigger


def describe_trigger(trigger: Trigger) -> str:
    """One line saying what started a run (``runs show``)."""
    if trigger.kind == "schedule":
        fire = when(trigger.fire_time) if trigger.fire_time else "?"
        return f"schedule {trigger.schedule} (fire time {fire})"
    return f"event {trigger.event} (#{trigger.event_seq} in NATFLOW_EVENTS)"


def register(sub: Any, opener: Opener) -> None:
    """Add ``schedules`` and ``events`` to the ``natflow`` parser."""

    def bound(command: Command) -> Handler:
        return bind(opener, command)

    p = sub.add_parser(
        "schedules",
        help="create, change, fire and inspect schedules",
        description="Schedules start a workflow on a cron or an interval; the engine fires them.",
    )
    q = p.add_subparsers(
        dest="schedules_command",
        required=True,
        metavar="create|list|describe|pause|resume|trigger|backfill|delete",
    )
    c = q.add_parser("create", help="create a schedule", description="Create a schedule.")
    c.add_argument("schedule_id", help="the schedule's id ([A-Za-z0-9_-])")
    c.add_argument("workflow", help="the workflow each fire starts")
    when = c.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron", help="cron fields (five, or six with seconds first; or @daily ...), in --timezone"
    )
    when.add_argument("--every", type=float, help="interval in whole seconds")
    c.add_argument(
        "--input", default=None, help="the input of each run: JSON, @file.json, or - for stdin"
    )
    c.add_argument("--timezone", default="UTC", help="IANA time zone of --cron (default UTC)")
    c.add_argument("--queue", default="default", help="queue of the runs (default: default)")
    c.add_argument(
        "--overlap",
        default="skip",
        choices=OVERLAP_POLICIES,
        help="what a fire does while the last run is open (default: skip)",
    )
    c.add_argument(
        "--catchup-window",
        type=seconds(),
        default=86400.0,
        help="seconds; older missed fires are recorded, not started (default 86400.0)",
    )
    c.add_argument(
        "--jitter",
        type=seconds(),
        default=0.0,
        help="seconds of random delay added to each fire (default 0.0)",
    )
    c.add_argument("--paused", action="store_true", help="create it paused")
    c.add_argument("--note", default=None, help="a note shown by describe")
    c.set_defaults(handler=bound(_create))
    for name, help_, command in (
        ("list", "list schedules", _list),
        ("describe", "show a schedule: next fire times, recent runs, missed fires", _describe),
        ("pause", "stop firing until resumed", _pause),
        ("resume", "fire again (fires while paused are not caught up)", _resume),
        ("trigger", "fire now", _trigger),
        ("delete", "remove a schedule (its runs go on)", _delete),
    ):
        c = q.add_parser(name, help=help_, description=help_[:1].upper() + help_[1:] + ".")
        if name != "list":
            c.add_argument("schedule_id", help="the schedule's id")
        if name in ("list", "describe"):
            c.add_argument("--json", action="store_true", help="print JSON")
        if name in ("pause", "resume"):
            c.add_argument("--note", default=None, help="why (shown by describe)")
        c.set_defaults(handler=bound(command))
    c = q.add_parser(
        "backfill",
        help="start every fire time in [START, END] now",
        description="Start every fire time in [START, END] now.",
    )
    c.add_argument("schedule_id", help="the schedule's id")
    c.add_argument("start", help="ISO time with zone, e.g. 2026-11-01T00:00:00+00:00")
    c.add_argument("end", help="ISO time with zone")
    c.set_defaults(handler=bound(_backfill))

    p = sub.add_parser(
        "events",
        help="events that start workflows (natflow.event.<name>)",
        description="Events on natflow.event.<name> start the workflows declared for them.",
    )
    q = p.add_subparsers(
        dest="events_command", required=True, metavar="list|triggers|undeclare|emit"
    )
    c = q.add_parser(
        "list",
        help="recent events and the runs they started, newest first",
        description="Recent events and the runs they started, newest first.",
    )
    c.add_argument("--limit", type=positive_int, default=20, help="how many (default 20)")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(handler=bound(_events))
    c = q.add_parser(
        "triggers",
        help="which workflows start on which event",
        description="Which workflows start on which event.",
    )
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(handler=bound(_triggers))
    c = q.add_parser(
        "undeclare",
        help="stop starting WORKFLOW on EVENT (a worker declares again)",
        description="Stop starting WORKFLOW on EVENT (a worker serving it declares it again).",
    )
    c.add_argument("event", help="the event name")
    c.add_argument("workflow", help="the workflow name")
    c.set_defaults(handler=bound(_undeclare))
    c = q.add_parser("emit", help="publish an event", description="Publish an event.")
    c.add_argument("name", help="the event name (tokens of [A-Za-z0-9_-] joined by dots)")
    c.add_argument(
        "payload", nargs="?", default=None, help="JSON, @file.json or - for stdin (default: null)"
    )
    c.add_argument("--event-id", default=None, help="deduplicates: the same id starts once")
    c.set_defaults(handler=bound(_emit))


def _print_json(value: Any) -> None:
    """Every field, defaults included: a schedule is stored without its defaults, and a
    script reading ``spec.queue`` or ``spec.overlap`` found no such key."""
    print(msgspec.json.format(msgspec.json.encode(_whole(value)), indent=2).decode())


def _whole(value: Any) -> Any:
    if isinstance(value, msgspec.Struct):
        return {name: _whole(getattr(value, name)) for name in value.__struct_fields__}
    if isinstance(value, list | tuple):
        return [_whole(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    return value


def _time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{text!r} is not an ISO time such as 2026-11-01T00:00:00+00:00"
        ) from None
    if moment.tzinfo is None:
        raise InvalidInput(f"{text!r} has no time zone; add one, e.g. +00:00")
    return moment


async def _create(conn: Connection, args: argparse.Namespace) -> int:
    spec = ScheduleSpec(
        cron=args.cron,
        every=None if args.every is None else to_seconds("--every", args.every),
        timezone=args.timezone,
        queue=args.queue,
        overlap=args.overlap,
        catchup_window=to_seconds("--catchup-window", args.catchup_window),
        jitter=to_seconds("--jitter", args.jitter),
    )
    ops = Schedules(conn)
    data = read_json_argument("--input", args.input)
    created = await ops.create(
        args.schedule_id, args.workflow, data, spec, paused=args.paused, note=args.note
    )
    if not created:
        raise InvalidInput(f"schedule {args.schedule_id!r} exists; delete it first")
    _show(await ops.describe(args.schedule_id))
    return 0


async def _list(conn: Connection, args: argparse.Namespace) -> int:
    found = await Schedules(conn).list()
    if args.json:
        _print_json(found)
        return 0
    rows = [
        (
            s.schedule_id,
            s.workflow,
            _when(s),
            "paused" if s.paused else "active",
            when(s.next_fire_times[0]) if s.next_fire_times else "-",
        )
        for s in found
    ]
    table(("SCHEDULE", "WORKFLOW", "WHEN", "STATE", "NEXT FIRE"), rows)
    return 0


def _when(s: ScheduleInfo) -> str:
    if s.spec.cron is not None:
        return f"{s.spec.cron} {s.spec.timezone}" if s.spec.timezone != "UTC" else s.spec.cron
    return f"every {s.spec.every:g} s"


def _show(s: ScheduleInfo) -> None:
    print(f"schedule  {s.schedule_id}" + (" (paused)" if s.paused else ""))
    print(f"workflow  {s.workflow} (queue {s.spec.queue})")
    print(f"when      {_when(s)}; overlap {s.spec.overlap}; catch-up {s.spec.catchup_window:g} s")
    if s.note:
        print(f"note      {s.note}")
    for t in s.next_fire_times:
        print(f"  next    {when(t)}")
    for f in s.recent_runs[:10]:
        print(f"  fire    {when(f.fire_time)} {f.action:10} {f.run_id or ''}")
    if s.missed_count:
        print(f"missed    {s.missed_count} fire(s), newest {when(s.missed[0])}")


async def _describe(conn: Connection, args: argparse.Namespace) -> int:
    info = await Schedules(conn).describe(args.schedule_id)
    if args.json:
        _print_json(info)
    else:
        _show(info)
    return 0


async def _pause(conn: Connection, args: argparse.Namespace) -> int:
    await Schedules(conn).pause(args.schedule_id, args.note)
    print(f"paused: {args.schedule_id}")
    return 0


async def _resume(conn: Connection, args: argparse.Namespace) -> int:
    await Schedules(conn).resume(args.schedule_id, args.note)
    print(f"resumed: {args.schedule_id}")
    return 0


async def _trigger(conn: Connection, args: argparse.Namespace) -> int:
    print(f"started: {await Schedules(conn).trigger(args.schedule_id)}")
    return 0


async def _backfill(conn: Connection, args: argparse.Namespace) -> int:
    run_ids = await Schedules(conn).backfill(args.schedule_id, _time(args.start), _time(args.end))
    for run_id in run_ids:
        print(f"started: {run_id}")
    return 0


async def _delete(conn: Connection, args: argparse.Namespace) -> int:
    await Schedules(conn).delete(args.schedule_id)
    print(f"deleted: {args.schedule_id}")
    return 0


async def _events(conn: Connection, args: argparse.Namespace) -> int:
    records = await recent_events(conn, limit=args.limit)
    if args.json:
        _print_json(records)
        return 0
    rows = [
        (
            str(r.seq),
            r.name,
            when(r.at),
            ", ".join(f"{wf}: {run_id or 'none'}" for wf, run_id in r.runs.items()) or "-",
        )
        for r in records
    ]
    table(("SEQ", "EVENT", "STORED", "RUNS"), rows, right=0b1)
    return 0


async def _triggers(conn: Connection, args: argparse.Namespace) -> int:
    found = await declarations(conn)
    if args.json:
        _print_json(found)
        return 0
    rows = [(d.event, d.workflow, d.queue, d.declared_by) for d in found]
    table(("EVENT", "WORKFLOW", "QUEUE", "DECLARED BY"), rows)
    return 0


async def _emit(conn: Connection, args: argparse.Namespace) -> int:
    seq = await emit(conn, args.name, read_json_argument("payload", args.payload), args.event_id)
    print(f"stored: #{seq}")
    return 0


async def _undeclare(conn: Connection, args: argparse.Namespace) -> int:
    if not await undeclare(conn, args.event, args.workflow):
        raise InvalidInput(
            f"workflow {args.workflow!r} does not start on event {args.event!r}; "
            f"`natflow events triggers` lists what does"
        )
    print(f"undeclared: {args.workflow} on {args.event}")
    return 0
