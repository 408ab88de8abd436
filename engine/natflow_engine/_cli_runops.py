"""CLI operations on runs and queues: ``natflow runs delete|restart|pause|resume``, ``natflow queues
pause|resume``, and the engine's ``--retention``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import msgspec

from ._cli_bind import Command, Handler, Opener, bind
from ._cli_types import duration
from ._connection import Connection, NoResponders, RequestTimeout
from ._errors import NatflowError, PermissionDenied, ServerUnavailable
from ._names import check_run_id
from ._queues import pause_queue, resume_queue
from ._restart import restart_run
from ._retention import delete_run
from ._runs import Runs
from ._signals import PAUSE, RESUME, send
from ._sites import command_for_site


def add_retention_option(p: argparse.ArgumentParser) -> None:
    """``--retention DURATION`` for ``natflow engine`` and ``natflow dev``."""
    p.add_argument(
        "--retention",
        default=os.environ.get("NATFLOW_RETENTION") or None,
        type=duration("--retention"),
        metavar="DURATION",
        help="delete closed runs this long after they closed, e.g. 30d, 12h, 90s "
        "(env NATFLOW_RETENTION; default: keep them; @workflow(retention=...) overrides)",
    )


def register(sub: Any, runs: Any, opener: Opener) -> None:
    """Add ``delete``, ``restart``, ``pause``, ``resume`` to ``natflow runs`` (``runs``: its
    subcommands, from :func:`natflow_engine._cli_runs.register`), and ``natflow queues``."""

    def handler(command: Command) -> Handler:
        return bind(opener, command)

    q = runs.add_parser(
        "delete",
        help="delete closed runs and every trace of them (an open run: cancel it first)",
    )
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="the ids of the runs to delete")
    q.set_defaults(handler=handler(_delete))
    q = runs.add_parser(
        "restart",
        help="run a closed run again from a step, with the code deployed now (new id RUN_ID-rN)",
    )
    q.add_argument("run_id", metavar="RUN_ID", help="the closed run to restart")
    q.add_argument(
        "--from-step",
        default=None,
        metavar="NAME[#N]",
        help="the step (its N-th occurrence) to run again first; default: the first failed one",
    )
    q.set_defaults(handler=handler(_restart))
    q = runs.add_parser(
        "pause",
        help="pause a run: no step or timer of it starts until it is resumed",
    )
    q.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    q.add_argument("--reason", metavar="TEXT", default=None, help="why, kept in its history")
    q.set_defaults(handler=handler(_pause_run), control=PAUSE)
    q = runs.add_parser("resume", help="resume a paused run")
    q.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    q.set_defaults(handler=handler(_pause_run), control=RESUME, reason=None)

    p = sub.add_parser(
        "queues",
        help="pause and resume whole task queues",
        description="Pause and resume whole task queues (every workflow's consumer of it).",
    )
    queues = p.add_subparsers(dest="queues_command", required=True, metavar="SUBCOMMAND")
    for name, help_ in (
        ("pause", "hand no task of this queue to any worker until it is resumed"),
        ("resume", "resume a paused queue"),
    ):
        q = queues.add_parser(name, help=help_)
        q.add_argument("queue", metavar="QUEUE", help="the queue's name")
        q.set_defaults(handler=handler(_queue))


# Errors that say nothing of one run: every other delete would fail alike.
_NOT_THE_RUNS = (PermissionDenied, ServerUnavailable, RequestTimeout, NoResponders)


async def _delete(conn: Connection, args: argparse.Namespace) -> int:
    """Delete each run given; one that cannot be deleted is named and the others still are
    (it stopped at the first, saying nothing of the rest)."""
    failed = 0
    for run_id in dict.fromkeys(args.run_ids):  # each once, in the order given
        try:
            removed = await delete_run(conn, run_id)
        except NatflowError as exc:
            if isinstance(exc, _NOT_THE_RUNS):
                raise  # the server or a permission: every other would fail alike
            print(f"natflow runs delete: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"deleted run {run_id} ({removed} messages)")
    return 1 if failed else 0


async def _restart(conn: Connection, args: argparse.Namespace) -> int:
    new_id = await restart_run(conn, args.run_id, args.from_step)
    print(f"restarted run {args.run_id} as {new_id}")
    return 0


async def _pause_run(conn: Connection, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    info = await Runs(conn).describe(args.run_id)
    if info.is_closed:
        raise NatflowError(f"run {args.run_id!r} has already {info.status}")
    reason = msgspec.json.encode(args.reason)
    if info.site:  # at a hub: a site's run, through the outbox
        await command_for_site(conn, info.site, args.run_id, args.control, reason)
    else:
        await send(conn, args.run_id, args.control, reason, None)
    print(f"{args.control[1:]} requested for run {args.run_id}")
    return 0


async def _queue(conn: Connection, args: argparse.Namespace) -> int:
    if args.queues_command == "pause":
        names = await pause_queue(conn, args.queue)
        print(
            f"queue {args.queue} paused ({len(names)} consumers): no worker takes its runs "
            "until it is resumed"
        )
    else:
        names = await resume_queue(conn, args.queue)
        print(f"queue {args.queue} resumed ({len(names)} consumers)")
    return 0
