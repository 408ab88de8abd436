"""CLI commands for operators: send a signal, list workers, list dead letters."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import msgspec

from ._cli_bind import Opener, with_connection
from ._cli_format import print_json, read_json_argument, table
from ._cli_types import positive_int
from ._connection import Connection
from ._errors import NatflowError
from ._human import ago, when
from ._names import check_run_id, check_token
from ._registry import list_workers
from ._runs import Runs
from ._sealing import seal
from ._signals import CANCEL, TERMINATE, dead_letters, send
from ._sites import command_for_site
from ._values import check_value_size, store_value


def register(sub: Any, opener: Opener) -> None:
    """Add the operator commands to the ``natflow`` parser."""

    async def signal(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, _signal)

    async def workers(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, _workers)

    async def dead(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, _dead)

    p = sub.add_parser("signal", help="send a signal to a run")
    p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
    p.add_argument("name", metavar="NAME", help="the signal's name, as the workflow waits for it")
    p.add_argument(
        "payload",
        metavar="PAYLOAD",
        nargs="?",
        default=None,
        help="JSON, @file.json to read a file, or - to read stdin (default: null)",
    )
    p.add_argument(
        "--signal-id",
        metavar="ID",
        default=None,
        help="deduplicates: the same id for the same run and signal name is delivered once "
        "(default: none, every send is a new signal)",
    )
    p.set_defaults(handler=signal)

    async def cancel(args: argparse.Namespace) -> int:
        return await with_connection(opener, args, _cancel)

    for name, help_ in (
        ("cancel", "cancel a run (its cleanup runs)"),
        ("terminate", "stop a run at once"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_id", metavar="RUN_ID", help="the run's id")
        p.add_argument(
            "--reason", metavar="TEXT", default=None, help="why, recorded in the run's history"
        )
        p.set_defaults(handler=cancel, control=name)

    p = sub.add_parser("workers", help="list live workers: queues, runs held, workflows")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=workers)

    p = sub.add_parser("signals", help="signals that could not be delivered")
    q = p.add_subparsers(dest="signals_command", required=True, metavar="dead")
    d = q.add_parser("dead", help="list dead-lettered signals, newest first")
    d.add_argument("--limit", metavar="N", type=positive_int, default=50, help="show at most N")
    d.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=dead)


async def _signal(conn: Connection, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    check_token("signal name", args.name)
    if args.signal_id is not None:
        check_token("signal id", args.signal_id)
    payload = read_json_argument("the payload", args.payload)
    info = await Runs(conn).readable(args.run_id)  # None: a signaller, which may not read
    if info is not None and info.is_closed:
        raise NatflowError(
            f"run {args.run_id!r} already ended ({info.status}); a signal can no longer reach it"
        )
    if conn.codec is not None:
        payload = seal(conn.codec, payload)
    check_value_size(conn, f"payload of signal {args.name!r}", len(payload))
    if info is not None and info.site:  # at a hub: a site's run, through the outbox
        await command_for_site(conn, info.site, args.run_id, args.name, payload, args.signal_id)
        print(f"signal {args.name!r} to {args.run_id}: stored at the hub for site {info.site}")
        return 0
    payload = await store_value(conn, f"payload of signal {args.name!r}", payload, args.run_id)
    ack = await send(conn, args.run_id, args.name, payload, args.signal_id)
    if ack.duplicate:
        print(
            f"signal {args.name!r} to {args.run_id}: already stored as #{ack.seq} "
            "(same --signal-id; delivered once)"
        )
    else:
        print(f"signal {args.name!r} to {args.run_id}: stored as #{ack.seq}")
    return 0


async def _cancel(conn: Connection, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    info = await Runs(conn).readable(args.run_id)  # None: a signaller, which may not read
    if info is not None and info.is_closed:
        print(f"run {args.run_id} already ended ({info.status}); nothing to do")
        return 0
    kind = CANCEL if args.control == "cancel" else TERMINATE
    reason = msgspec.json.encode(args.reason)
    if info is not None and info.site:  # at a hub: a site's run, through the outbox
        await command_for_site(conn, info.site, args.run_id, kind, reason)
    else:
        await send(conn, args.run_id, kind, reason, None)
    print(f"{args.control} requested for run {args.run_id}")
    return 0


async def _workers(conn: Connection, args: argparse.Namespace) -> int:
    found = await list_workers(conn)
    if args.json:
        print_json(found)
        return 0
    if not found:
        print("no live workers")
        return 0
    now = datetime.now(UTC)
    table(
        ("WORKER", "QUEUES", "RUNS", "HEARTBEAT", "USER", "WORKFLOWS"),
        [
            (
                w.identity,
                ",".join(w.queues),
                str(w.held),
                ago(w.heartbeat_at, now),
                # who the NATS server says the worker connected as
                (w.user or "-") + (f" in account {w.account}" if w.account else ""),
                ", ".join(w.workflows) + (" (draining)" if w.draining else ""),
            )
            for w in found
        ],
        right=0b01100,
    )
    return 0


async def _dead(conn: Connection, args: argparse.Namespace) -> int:
    letters = await dead_letters(conn, args.limit)
    if args.json:
        print_json(letters)
        return 0
    if not letters:
        print("no dead-lettered signals")
        return 0
    table(
        ("AT", "SIGNAL", "SUBJECT", "REASON"),
        [(when(d.at), f"#{d.signal_seq}", d.subject, d.reason) for d in letters],
    )
    return 0
