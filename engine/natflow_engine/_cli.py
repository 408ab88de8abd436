"""The ``natflow`` command line.

Commands that need workflow code (``natflow worker``) are contributed by the SDK through the
``natflow.commands`` entry-point group, so this package never imports the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ._cli_ops import register as register_ops
from ._cli_runops import add_retention_option
from ._cli_runops import register as register_run_ops
from ._connection import Connection, connect, default_url
from ._engine import Engine
from ._errors import NatflowError, ServerUnavailable
from ._leases import Leases
from ._logs import configure_logging
from ._metrics import DEFAULT_ENGINE_PORT, serve_metrics
from ._runs import Runs
from ._server import EmbeddedServer
from ._state import fold_steps
from ._streams import ensure_streams, history_subject

log = logging.getLogger("natflow.cli")

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats-py connect options from the CLI's credential and TLS flags."""
    options: dict[str, Any] = {}
    if args.creds:
        options["user_credentials"] = args.creds
    if args.user:
        options["user"] = args.user
        options["password"] = args.password or ""
    if args.token:
        options["token"] = args.token
    if args.tls_ca or args.tls_cert:
        context = ssl.create_default_context(cafile=args.tls_ca)
        if args.tls_cert:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        options["tls"] = context
    return options


async def open_connection(args: argparse.Namespace, name: str) -> Connection:
    return await connect(args.url, name=name, **connect_options(args))


def _print_json(value: Any) -> None:
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


# -- commands ----------------------------------------------------------------------------


async def cmd_start(args: argparse.Namespace) -> int:
    try:
        data = msgspec.json.encode(json.loads(args.input)) if args.input else b"null"
    except json.JSONDecodeError as exc:
        raise NatflowError(f"--input is not valid JSON: {exc}") from exc
    conn = await open_connection(args, "natflow-cli")
    try:
        runs = Runs(conn)
        run_id, created = await runs.start(args.workflow, args.queue, data, args.run_id)
        print(f"{'started' if created else 'exists'}: {run_id}")
        if args.wait:
            return await _wait_and_show(conn, runs, run_id)
        return 0
    finally:
        await conn.close()


async def _wait_and_show(conn: Connection, runs: Runs, run_id: str) -> int:
    sub = await conn.nc.subscribe(history_subject(run_id))
    try:
        while True:
            info = await runs.describe(run_id)
            if info.is_closed:
                _print_json(info)
                return 0 if info.status == "completed" else 1
            try:
                await sub.next_msg(timeout=30)
            except Exception:  # timeout: re-read in case an event slipped by a reconnect
                continue
    finally:
        await sub.unsubscribe()


async def cmd_runs(args: argparse.Namespace) -> int:
    from ._index import RunIndex

    conn = await open_connection(args, "natflow-cli")
    try:
        runs = Runs(conn)
        if args.runs_command == "list":
            await ensure_streams(conn)
            found = await RunIndex(conn).scan(
                workflow=args.workflow, status=args.status, limit=args.limit
            )
            if args.json:
                _print_json(found)
            else:
                print(f"{'RUN ID':34} {'WORKFLOW':18} {'STATUS':10} CREATED")
                for r in found:
                    created = f"{r.created_at:%Y-%m-%d %H:%M:%S}"
                    print(f"{r.run_id:34} {r.workflow:18} {r.status:10} {created}")
            return 0
        events = await runs.events(args.run_id)
        if args.runs_command == "history":
            for event in events:
                print(msgspec.json.encode(event).decode())
            return 0
        info = await runs.describe(args.run_id)
        steps = fold_steps(events)
        lease = await Leases(conn).get(args.run_id)
        holder = lease[0] if lease is not None else None
        if args.json:
            _print_json({"run": info, "steps": steps, "lease": holder})
            return 0
        _show_run(info, steps)
        if holder is not None:
            print(f"held by   {holder.worker} (lease until {holder.expires_at.isoformat()})")
        return 0
    finally:
        await conn.close()


def _show_run(info: Any, steps: list[Any]) -> None:
    print(f"run       {info.run_id}")
    print(f"workflow  {info.workflow} (queue {info.queue})")
    print(f"status    {info.status}" + (f" - {info.current}" if info.current else ""))
    if info.worker:
        print(f"last held {info.worker}")
    print(f"created   {info.created_at.isoformat()}")
    if info.closed_at:
        print(f"closed    {info.closed_at.isoformat()}")
    if info.status == "completed":
        print(f"result    {msgspec.json.encode(info.result).decode()}")
    if info.error:
        print(f"error     {info.error.type}: {info.error.message}")
    for s in steps:
        outcome = (
            msgspec.json.encode(s.result).decode()
            if s.status == "completed"
            else (f"{s.error.type}: {s.error.message}" if s.error else "")
        )
        print(f"  step {s.name}#{s.occurrence:<3} {s.status:9} attempts={s.attempts} {outcome}")


async def cmd_init(args: argparse.Namespace) -> int:
    conn = await open_connection(args, "natflow-init")
    try:
        await ensure_streams(conn)
        print("natflow streams are ready")
        return 0
    finally:
        await conn.close()


async def cmd_engine(args: argparse.Namespace) -> int:
    conn = await open_connection(args, "natflow-engine")
    serve_metrics(args.metrics_port, args.metrics_host)
    try:
        engine = Engine(conn, metrics_interval=args.metrics_interval, retention=args.retention)
        await _until_signalled(engine.run)
        return 0
    finally:
        await conn.close()


async def _until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` until SIGINT or SIGTERM."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await main()
        tg.cancel_scope.cancel()


def _server_for(args: argparse.Namespace) -> EmbeddedServer:
    config = Path(args.config)
    if not config.exists():
        raise NatflowError(f"no server configuration at {config}; pass --config PATH")
    return EmbeddedServer(config, cwd=config.parent)


async def cmd_server(args: argparse.Namespace) -> int:
    server = _server_for(args)
    server.start()
    print(f"nats-server running at {server.url} (config {server.config}); Ctrl-C stops it")
    try:
        await _until_signalled(lambda: anyio.sleep_forever())
    finally:
        server.stop()
    return 0


async def cmd_dev(args: argparse.Namespace) -> int:
    server = _server_for(args)
    server.start()
    print(f"natflow dev: nats-server at {server.url}, engine running; Ctrl-C stops both")
    try:
        conn = await connect(server.url, name="natflow-engine")
        serve_metrics(args.metrics_port, args.metrics_host)
        try:
            engine = Engine(conn, metrics_interval=args.metrics_interval, retention=args.retention)
            await _until_signalled(engine.run)
        finally:
            await conn.close()
    finally:
        server.stop()
    return 0


# -- the parser --------------------------------------------------------------------------


def add_metrics_options(
    p: argparse.ArgumentParser, default_port: int, env: str, *, engine: bool = False
) -> None:
    """``--metrics-port``/``--metrics-host``: where the process serves Prometheus metrics."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get(env, default_port)),
        help=f"serve Prometheus metrics on this port (env {env}, default {default_port}; "
        "0 turns them off)",
    )
    p.add_argument(
        "--metrics-host",
        default=os.environ.get("NATFLOW_METRICS_HOST", "0.0.0.0"),
        help="address the metrics endpoint listens on (env NATFLOW_METRICS_HOST)",
    )
    if engine:
        p.add_argument(
            "--metrics-interval",
            type=float,
            default=float(os.environ.get("NATFLOW_METRICS_INTERVAL", "5")),
            help="seconds between reads of queue, worker and run counts from JetStream "
            "(env NATFLOW_METRICS_INTERVAL)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="natflow", description="Durable workflows on NATS JetStream."
    )
    parser.add_argument(
        "--url", default=None, help=f"NATS server URL (env NATFLOW_URL, default {default_url()})"
    )
    parser.add_argument(
        "--creds", default=os.environ.get("NATFLOW_CREDS"), help="NATS credentials file"
    )
    parser.add_argument("--user", default=os.environ.get("NATFLOW_USER"))
    parser.add_argument("--password", default=os.environ.get("NATFLOW_PASSWORD"))
    parser.add_argument("--token", default=os.environ.get("NATFLOW_TOKEN"))
    parser.add_argument("--tls-ca", default=os.environ.get("NATFLOW_TLS_CA"))
    parser.add_argument("--tls-cert", default=os.environ.get("NATFLOW_TLS_CERT"))
    parser.add_argument("--tls-key", default=os.environ.get("NATFLOW_TLS_KEY"))
    parser.add_argument("--log-level", default=os.environ.get("NATFLOW_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("NATFLOW_LOG_JSON", "") not in ("", "0"),
        help="log one JSON object per line (env NATFLOW_LOG_JSON=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    default_conf = os.environ.get("NATFLOW_CONFIG", "nats.conf")
    p = sub.add_parser("dev", help="embedded nats-server (nats.conf) plus the engine services")
    p.add_argument("--config", default=default_conf)
    add_metrics_options(p, DEFAULT_ENGINE_PORT, "NATFLOW_ENGINE_METRICS_PORT", engine=True)
    add_retention_option(p)
    p.set_defaults(handler=cmd_dev)

    p = sub.add_parser("server", help="embedded nats-server with nats.conf")
    p.add_argument("--config", default=default_conf)
    p.set_defaults(handler=cmd_server)

    p = sub.add_parser("engine", help="the engine services (dispatcher, run index)")
    add_metrics_options(p, DEFAULT_ENGINE_PORT, "NATFLOW_ENGINE_METRICS_PORT", engine=True)
    add_retention_option(p)
    p.set_defaults(handler=cmd_engine)

    p = sub.add_parser("init", help="create natflow's streams (optional: done on first use)")
    p.set_defaults(handler=cmd_init)

    p = sub.add_parser("start", help="start a run")
    p.add_argument("workflow")
    p.add_argument("--input", default=None, help="the input as JSON")
    p.add_argument("--run-id", default=None)
    p.add_argument("--queue", default="default")
    p.add_argument("--wait", action="store_true", help="wait for the result and show the run")
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser("runs", help="list and inspect runs")
    runs = p.add_subparsers(dest="runs_command", required=True, metavar="list|show|history|...")
    q = runs.add_parser("list")
    q.add_argument("--workflow", default=None)
    q.add_argument("--status", default=None)
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true")
    q = runs.add_parser("show")
    q.add_argument("run_id")
    q.add_argument("--json", action="store_true")
    q = runs.add_parser("history")
    q.add_argument("run_id")
    p.set_defaults(handler=cmd_runs)
    register_run_ops(sub, runs, open_connection)

    register_ops(sub, open_connection)
    for entry in importlib.metadata.entry_points(group="natflow.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    if args.url is None:
        args.url = default_url()
    handler: Handler = args.handler
    try:
        return asyncio.run(handler(args))
    except ServerUnavailable as exc:
        print(f"natflow {args.command}: {exc}", file=sys.stderr)
        return 1
    except NatflowError as exc:
        print(f"natflow {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
