"""CLI commands about runs: ``natflow start`` and ``natflow runs list|show|history|wait`` (the
operations on runs, ``delete|pause|resume|restart``, are in ``_cli_runops``)."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from ._cli_bind import Opener, with_connection
from ._cli_format import print_json, printable, read_json_argument, table
from ._cli_options import until_interrupted
from ._cli_schedules import describe_trigger
from ._cli_sites import print_site_run
from ._cli_types import positive_int
from ._connection import Connection
from ._errors import PermissionDenied
from ._flow_decls import start_declared
from ._human import duration, when
from ._index import RunIndex, summaries_of
from ._input_schema import announced, check_input
from ._leases import Leases
from ._names import check_queue, check_run_id, check_workflow_name
from ._registry import WorkerInfo, list_workers
from ._runs import Runs, new_run_id
from ._sealing import sealed_key
from ._start_service import request_start
from ._state import RUN_STATUSES, RunInfo, StepInfo, fold_steps
from ._streams import (
    history_subject,
    run_level_subject,
    stored_feed,
    stored_feed_open,
    stored_feed_refused,
    stored_subject,
)
from .events import ChildCompleted, ChildFailed, ChildStarted, Event, RunStarted

START_WORKER_HINT = "start one with `natflow worker MODULE`; `natflow workers` lists what is served"


def run_status(value: str) -> str:
    """argparse type: one of the run statuses."""
    if value not in RUN_STATUSES:
        raise argparse.ArgumentTypeError(
            f"unknown status {value!r}; use one of {', '.join(RUN_STATUSES)}"
        )
    return value


def register(sub: Any, opener: Opener) -> Any:
    """Add ``start`` and ``runs`` to the ``natflow`` parser.

    Returns:
        The subcommands of ``natflow runs``, for commands registered elsewhere.
    """

    async def start(args: argparse.Namespace) -> int:
        # Bad arguments are reported before connecting (and stdin is read once, up front).
        args.data = read_json_argument("--input", args.input)
        if args.run_id is not None:
            check_run_id(args.run_id)
        check_workflow_name(args.workflow)
        check_queue(args.queue)
        return await with_connection(opener, args, cmd_start)

    async def runs(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, cmd_runs)

    p = sub.add_parser(
        "start",
        help="start a run of a workflow",
        description="Start a run of WORKFLOW. The run id is an idempotency key: starting an id "
        "that exists makes no second run.",
    )
    p.add_argument("workflow", metavar="WORKFLOW", help="the workflow's name")
    p.add_argument(
        "--input",
        metavar="JSON",
        default=None,
        help="the run's input: JSON, @file.json to read a file, or - to read stdin (default: null)",
    )
    p.add_argument("--run-id", metavar="ID", default=None, help="the run's id (default: a new one)")
    p.add_argument("--queue", metavar="QUEUE", default="default", help="the task queue")
    p.add_argument(
        "--via-engine",
        action="store_true",
        help="ask the engine to create the run (for a user that may not write history: the "
        "frontend role); the engine applies the flow control the workflow's workers declare",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the run to end and show it (on a terminal, with what it is doing)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=start)

    p = sub.add_parser(
        "runs",
        help="list, inspect and operate on runs",
        description="List and inspect runs; delete, pause, resume and restart them.",
    )
    q = p.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    r = q.add_parser(
        "list",
        help="runs, newest first (from the engine's index: needs a running engine)",
    )
    r.add_argument("--workflow", metavar="NAME", default=None, help="only this workflow's runs")
    r.add_argument(
        "--status",
        metavar="STATUS",
        type=run_status,
        default=None,
        help=f"only runs in this status: {', '.join(RUN_STATUSES)}",
    )
    r.add_argument("--limit", metavar="N", type=positive_int, default=50, help="show at most N")
    r.add_argument("--json", action="store_true", help="print JSON")
    for name, help_ in (
        ("show", "one run: status, result or error, steps, holder"),
        ("history", "one run's events, oldest first"),
        ("wait", "wait for a run to end, then show it"),
    ):
        r = q.add_parser(name, help=help_)
        r.add_argument("run_id", metavar="RUN_ID", help="the run's id")
        r.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=runs)
    return q


# -- start -------------------------------------------------------------------------------


async def cmd_start(conn: Connection, args: argparse.Namespace) -> int:
    data: bytes = args.data  # read (and checked) before connecting
    workers = await list_workers(conn)
    serving = _serving(workers, args.workflow, args.queue)
    if serving:
        check_input(
            args.workflow,
            data,
            announced(serving, args.workflow),
            what="--input",
            give="pass --input JSON",
        )
    else:
        warning = nobody_serves(args.workflow, args.queue, workers)
        print(f"natflow start: warning: {warning}", file=sys.stderr)
    runs = Runs(conn)
    chosen = args.run_id is not None
    if args.via_engine:
        run_id, created = await request_start(
            conn, args.workflow, args.queue, data, args.run_id or new_run_id(), chosen_run_id=chosen
        )
    else:
        try:
            run_id, created = await start_declared(  # with the flow control its workers declare
                runs, args.workflow, args.queue, data, args.run_id, chosen_run_id=chosen
            )
        except PermissionDenied as exc:
            if "natflow.history." not in str(exc):
                raise
            # Granting it is what the frontend role exists to avoid.
            raise PermissionDenied(
                f"{exc}; or, for a user that may not write history (the frontend role), "
                "pass --via-engine to have the engine start the run"
            ) from None
    if not args.json:
        if created:
            print(f"started: {run_id}")
        else:
            print(f"exists: {run_id} (started before; nothing new started)")
            if args.input is not None and await _recorded_input(runs, run_id) != _same(data):
                print("  it keeps its recorded input; the --input given now was not used")
    if args.wait:
        args.waiting_for = run_id
        return await until_interrupted(_wait_and_show(conn, runs, run_id, args.json))
    if args.json:
        print_json({"run_id": run_id, "created": created})
    return 0


def _serving(workers: list[WorkerInfo], workflow: str, queue: str) -> list[WorkerInfo]:
    return [w for w in workers if queue in w.queues_of(workflow) and not w.draining]


def nobody_serves(workflow: str, queue: str, workers: list[WorkerInfo] | None = None) -> str:
    """The sentence for a run no live worker will take, with the queues that do serve it."""
    elsewhere = sorted({q for w in workers or [] for q in w.queues_of(workflow)} - {queue})
    hint = (
        f"live workers serve it on queue {', '.join(elsewhere)} (pass --queue)"
        if elsewhere
        else START_WORKER_HINT
    )
    return (
        f"no live worker serves workflow {workflow!r} on queue {queue!r}; the run waits "
        f"until one does ({hint})"
    )


def _same(data: bytes) -> Any:
    return msgspec.json.decode(data)


async def _recorded_input(runs: Runs, run_id: str) -> Any:
    first = (await runs.events(run_id))[0]
    return _same(first.input) if isinstance(first, RunStarted) else None


async def _wait_and_show(
    conn: Connection, runs: Runs, run_id: str, as_json: bool, *, progress: bool | None = None
) -> int:
    """Wait for the run to close; on a terminal, say what it is doing whenever that changes.

    Each look describes the run, a read of its whole history: so it looks when a run-level
    event (a claim, a wait, the end) is heard, or, showing progress, at a step's too, then
    once for all the events that came meanwhile, never once per event of a long run."""
    if progress is None:
        progress = sys.stderr.isatty() and not as_json
    began, shown = time.monotonic(), ""
    if progress:
        heard = history_subject(run_id)
    else:  # the stored feed where known: what is heard there is readable
        heard = stored_subject(run_id) if stored_feed(conn) else run_level_subject(run_id)
    feed = heard if heard == stored_subject(run_id) else None

    def refused() -> bool:  # the stored feed, by permissions written before it
        return feed is not None and not stored_feed_open(conn, feed)

    sub = await conn.nc.subscribe(heard)
    try:
        while True:
            if refused():  # listen on the run's own subject instead
                stored_feed_refused(conn)
                await sub.unsubscribe()
                feed, sub = None, await conn.nc.subscribe(run_level_subject(run_id))
            while sub.pending_msgs:  # heard while the last look was made: it saw them
                await sub.next_msg()
            info = await runs.describe(run_id)
            if info.is_closed:
                await _show(conn, runs, info, as_json)
                return 0 if info.status == "completed" else 1
            if progress:
                doing = info.current or info.status
                if info.status == "pending":
                    workers = await list_workers(conn)
                    if not _serving(workers, info.workflow, info.queue):
                        doing = "pending: " + nobody_serves(info.workflow, info.queue, workers)
                if doing != shown:
                    elapsed = duration(time.monotonic() - began)
                    print(f"  {elapsed:>8}  {printable(doing)}", file=sys.stderr, flush=True)
                    shown = doing
            if refused():
                continue  # while it looked: change subjects, then look again
            try:
                heard_next = sub.next_msg(timeout=5 if progress else 30)
                await (heard_next if feed is None else conn.guarded(feed, heard_next))
            except Exception:  # timeout: re-read in case an event slipped by a reconnect
                continue  # or refused the feed: the loop changes subjects
    finally:
        await sub.unsubscribe()


def interrupted_wait(run_id: str) -> str:
    """What Ctrl-C during ``--wait`` prints: the run is not stopped."""
    return (
        f"stopped waiting; run {run_id} goes on. Follow it with `natflow runs wait {run_id}`, "
        f"see it with `natflow runs show {run_id}`, stop it with `natflow cancel {run_id}`"
    )


# -- runs --------------------------------------------------------------------------------


async def cmd_runs(conn: Connection, args: argparse.Namespace) -> int:
    runs = Runs(conn)
    if args.runs_command == "list":
        return await _list(conn, args)
    if args.runs_command == "wait":
        args.waiting_for = args.run_id
        return await until_interrupted(_wait_and_show(conn, runs, args.run_id, args.json))
    if args.runs_command == "history":
        events = await runs.events(args.run_id)
        if args.json:
            print_json(events)
        else:
            _show_history(events)
        return 0
    await _show(conn, runs, await runs.describe(args.run_id), args.json)
    return 0


async def _list(conn: Connection, args: argparse.Namespace) -> int:
    found, total, looked = await RunIndex(conn).page(
        workflow=args.workflow, status=args.status, limit=args.limit
    )
    if looked is not None:
        print(
            f"the run index holds more than {looked:,} run summaries; this list looked at the "
            f"newest {looked:,} (its filters and count cover those): set a retention to keep "
            f"it smaller, or page through all of them in the console",
            file=sys.stderr,
        )
    if args.json:
        print_json(found)
    elif found:
        now = datetime.now(UTC)
        sites = any(r.site for r in found)  # at a hub with sites: where each run lives
        table(
            ("RUN ID", "WORKFLOW", "STATUS", "CREATED", "DURATION", *(("SITE",) if sites else ())),
            [
                (
                    r.run_id,
                    r.workflow,
                    r.status,
                    when(r.created_at),
                    duration(((r.closed_at or now) - r.created_at).total_seconds()),
                    *((r.site or "hub",) if sites else ()),
                )
                for r in found
            ],
            right=0b10000,
        )
    else:
        filtered = args.workflow is not None or args.status is not None
        print(
            "no runs match"
            if filtered
            else "no runs (the list is the engine's run index: is `natflow dev` or "
            "`natflow engine` running?)"
        )
    if total > len(found):
        more = "+" if looked is not None else ""  # of the summaries it looked at
        print(f"{len(found)} of {total}{more}; --limit N shows more", file=sys.stderr)
    return 0


def _took(start: datetime | None, end: datetime | None) -> str:
    return duration((end - start).total_seconds()) if start and end else "-"


def fold_children(events: list[Event]) -> list[dict[str, Any]]:
    """The run's child runs, in the order it started them, with how each ended (if it did)."""
    children: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, ChildStarted):
            children[event.seq] = {
                "run_id": event.child_run_id,
                "workflow": event.name,
                "queue": event.queue,
                "status": "started",
            }
        elif isinstance(event, ChildCompleted | ChildFailed) and event.seq in children:
            children[event.seq]["status"] = (
                "completed" if isinstance(event, ChildCompleted) else event.status
            )
    return [children[seq] for seq in sorted(children)]


async def _show(conn: Connection, runs: Runs, info: RunInfo, as_json: bool) -> None:
    if info.site:  # a site's run, seen from the hub: its summary is all the hub has
        print_json({"run": info}) if as_json else print_site_run(info)
        return
    events = await runs.events(info.run_id)
    steps = fold_steps(events)
    children = fold_children(events)
    # A child whose outcome the parent's history lacks (still open, or open when the parent
    # closed, as its parent_close policy then ended it): its own summary says how it is.
    unended = [c["run_id"] for c in children if c["status"] == "started"]
    now = {s.run_id: s.status for s in await summaries_of(conn, unended)}
    for child in children:
        child["status"] = now.get(child["run_id"], child["status"])
    lease = await Leases(conn).get(info.run_id)
    holder = lease[0] if lease is not None else None
    unserved = None
    # Pending, or shown running by a worker that is gone (its lease lapsed) and no worker
    # left to take it (a rolling deploy that dropped the workflow): it said "running" for good.
    orphaned = not info.is_closed and info.status not in ("blocked", "paused") and holder is None
    if info.status == "pending" or orphaned:
        workers = await list_workers(conn)
        if not _serving(workers, info.workflow, info.queue):
            unserved = nobody_serves(info.workflow, info.queue, workers)
    if as_json:
        print_json(
            {
                "run": info,
                "steps": steps,
                "children": children,
                "lease": holder,
                "unserved": unserved,
            }
        )
        return
    print(f"run       {info.run_id}")
    print(f"workflow  {info.workflow} (queue {info.queue})")
    current = info.current if info.current != info.status else None  # "paused: paused"
    if current and current.startswith(f"{info.status}: "):  # "blocked: blocked: ..."
        current = current.removeprefix(f"{info.status}: ")
    print(f"status    {info.status}" + (f": {printable(current)}" if current else ""))
    if info.parent:
        print(f"parent    {info.parent}")
    if unserved:
        print(f"waiting   {unserved}")
    if info.worker:
        print(f"worker    {info.worker} (last to hold it)")
    print(f"created   {when(info.created_at)}")
    if info.stretch > 1:  # continue-as-new: history holds the current stretch only
        print(f"stretch   {info.stretch} ({info.stretch - 1} before, continued as new)")
    if info.trigger:
        print(f"started by {describe_trigger(info.trigger)}")
    if info.restarted_from:
        print(f"restarts  {info.restarted_from}")
    if info.restarted_as:
        print(f"restarted as {info.restarted_as}")
    if info.closed_at:
        print(f"closed    {when(info.closed_at)} (took {_took(info.created_at, info.closed_at)})")
    if info.status == "completed":
        print(f"result    {shown(info.result)}")
    elif info.status in ("cancelled", "terminated"):
        print(f"reason    {printable(info.error.message) if info.error else '-'}")
    elif info.error:
        print(f"error     {printable(info.error.type)}: {printable(info.error.message)}")
    if holder is not None:
        print(f"held by   {holder.worker} (lease until {when(holder.expires_at)})")
    if steps:
        print()
        _show_steps(steps)
    if children:
        print()
        rows = [(c["run_id"], c["workflow"], c["queue"], c["status"]) for c in children]
        table(("CHILD RUN", "WORKFLOW", "QUEUE", "STATUS"), rows)


def shown(value: Any) -> str:
    """A value as JSON, or which key sealed it when this CLI holds no key for it."""
    key_id = sealed_key(value)
    return f"encrypted (key {key_id})" if key_id else msgspec.json.encode(value).decode()


def _show_steps(steps: list[StepInfo]) -> None:
    rows = []
    for s in steps:
        if s.status == "completed":
            outcome = shown(s.result)
        else:
            outcome = f"{s.error.type}: {s.error.message}" if s.error else ""
        if len(outcome) > 80:
            outcome = outcome[:77] + "..."
        took = _took(s.started_at, s.finished_at)
        rows.append((s.name, str(s.occurrence), s.status, str(s.attempts), took, outcome))
    table(("STEP", "#", "STATUS", "ATTEMPTS", "TOOK", "RESULT / ERROR"), rows, right=0b011010)


def _show_history(events: list[Event]) -> None:
    rows = []
    for n, event in enumerate(events, 1):
        # Its position in the run, from its id: a count would shift past an event left out
        # (one that does not decode) or in a later stretch of a continued run.
        position = event.id.rpartition(":")[2]
        n = int(position) if position.isdigit() else n
        fields: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
        kind = fields.pop("type", type(event).__name__)
        for key in ("v", "id", "at"):
            fields.pop(key, None)
        detail = " ".join(
            f"{k}={msgspec.json.encode(v).decode()}" for k, v in fields.items() if v is not None
        )
        rows.append((str(n), when(event.at), kind, detail[:120]))
    table(("#", "TIME", "EVENT", "DETAIL"), rows, right=0b1)
