"""CLI commands for operators: send a signal, list workers, list dead letters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from ._connection import Connection
from ._errors import InvalidInput, NatflowError
from ._names import check_run_id, check_token
from ._registry import list_workers
from ._runs import Runs
from ._sealing import seal
from ._signals import CANCEL, TERMINATE, dead_letters, send
from ._streams import ensure_streams

Opener = Callable[[argparse.Namespace, str], Awaitable[Connection]]


def register(sub: Any, opener: Opener) -> None:
    """Add the operator commands to the ``natflow`` parser."""

    async def signal(args: argparse.Namespace) -> int:
        return await _with(opener, args, _signal)

    async def workers(args: argparse.Namespace) -> int:
        return await _with(opener, args, _workers)

    async def dead(args: argparse.Namespace) -> int:
        return await _with(opener, args, _dead)

    p = sub.add_parser("signal", help="send a signal to a run")
    p.add_argument("run_id")
    p.add_argument("name")
    p.add_argument("payload", nargs="?", default=None, help="JSON (default: null)")
    p.add_argument("--signal-id", default=None, help="deduplicates: the same id is sent once")
    p.set_defaults(handler=signal)

    async def cancel(args: argparse.Namespace) -> int:
        return await _with(opener, args, _cancel)

    for name, help_ in (
        ("cancel", "cancel a run (its cleanup runs)"),
        ("terminate", "stop a run at once"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("run_id")
        p.add_argument("--reason", default=None)
        p.set_defaults(handler=cancel, control=name)

    p = sub.add_parser("workers", help="list live workers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=workers)

    p = sub.add_parser("signals", help="signals that could not be delivered")
    q = p.add_subparsers(dest="signals_command", required=True, metavar="dead")
    d = q.add_parser("dead", help="list dead-lettered signals, newest first")
    d.add_argument("--limit", type=int, default=50)
    d.add_argument("--json", action="store_true")
    p.set_defaults(handler=dead)


async def _with(
    opener: Opener,
    args: argparse.Namespace,
    command: Callable[[Connection, argparse.Namespace], Awaitable[int]],
) -> int:
    conn = await opener(args, "natflow-cli")
    try:
        await ensure_streams(conn)
        return await command(conn, args)
    finally:
        await conn.close()


async def _signal(conn: Connection, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    check_token("signal name", args.name)
    if args.signal_id is not None:
        check_token("signal id", args.signal_id)
    try:
        payload = msgspec.json.encode(json.loads(args.payload)) if args.payload else b"null"
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the payload is not valid JSON: {exc}") from exc
    info = await Runs(conn).describe(args.run_id)
    if info.is_closed:
        raise NatflowError(f"run {args.run_id!r} has already {info.status}")
    if conn.codec is not None:
        payload = seal(conn.codec, payload)
    ack = await send(conn, args.run_id, args.name, payload, args.signal_id)
    print(
        f"signal {args.name!r} to {args.run_id}: stored as #{ack.seq}"
        + (" (duplicate)" if ack.duplicate else "")
    )
    return 0


async def _cancel(conn: Connection, args: argparse.Namespace) -> int:
    check_run_id(args.run_id)
    info = await Runs(conn).describe(args.run_id)
    if info.is_closed:
        print(f"run {args.run_id} has already {info.status}; nothing to do")
        return 0
    kind = CANCEL if args.control == "cancel" else TERMINATE
    await send(conn, args.run_id, kind, msgspec.json.encode(args.reason), None)
    print(f"{args.control} requested for run {args.run_id}")
    return 0


def _ago(when: datetime) -> str:
    return f"{(datetime.now(UTC) - when).total_seconds():.1f}s ago"


async def _workers(conn: Connection, args: argparse.Namespace) -> int:
    found = await list_workers(conn)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(found), indent=2).decode())
        return 0
    print(f"{'WORKER':40} {'QUEUES':16} {'RUNS':>4} {'HEARTBEAT':>12}  WORKFLOWS")
    for w in found:
        state = " (draining)" if w.draining else ""
        print(
            f"{w.identity:40} {','.join(w.queues):16} {w.held:>4} "
            f"{_ago(w.heartbeat_at):>12}  {', '.join(w.workflows)}{state}"
        )
        if w.user:  # who the NATS server says it connected as
            print(f"{'':40} user {w.user}" + (f" in account {w.account}" if w.account else ""))
    if not found:
        print("no live workers")
    return 0


async def _dead(conn: Connection, args: argparse.Namespace) -> int:
    letters = await dead_letters(conn, args.limit)
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(letters), indent=2).decode())
        return 0
    for d in letters:
        print(f"{d.at:%Y-%m-%d %H:%M:%S} #{d.signal_seq:<6} {d.subject}: {d.reason}")
    if not letters:
        print("no dead-lettered signals")
    return 0
