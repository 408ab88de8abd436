"""The ``natflow`` command line.

Commands that need workflow code (``natflow worker``) are contributed by the SDK through the
``natflow.commands`` entry-point group, so this package never imports the SDK.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any, Final, NoReturn

import anyio

from ._batch_staging import GLOBAL_ACCOUNT
from ._cli_auth import register as register_auth
from ._cli_ops import register as register_ops
from ._cli_options import add_metrics_options, connect_options, until_signalled
from ._cli_runops import add_retention_option
from ._cli_runops import register as register_run_ops
from ._cli_runs import interrupted_wait
from ._cli_runs import register as register_runs
from ._cli_schedules import register as register_triggers
from ._cli_sites import add_site_options, check_site_options, site_list
from ._cli_types import port
from ._collector import tune_collector
from ._connect import DEFAULT_URL, connect, default_url
from ._connection import Connection
from ._engine import Engine
from ._errors import NatflowError
from ._event_loop import run_event_loop
from ._jsz import Jsz, read_jsz
from ._logs import configure_logging
from ._metrics import DEFAULT_ENGINE_PORT, serve_metrics
from ._sealing import AesGcmCodec
from ._server import PACKAGED_CONFIG, EmbeddedServer, PortInUse, relaxed_config
from ._streams import ensure_streams, record_sync_mode
from .console._cli import add_ui_options, serve_console_if_possible
from .console._cli import register as register_console

log = logging.getLogger("natflow.cli")

Handler = Callable[[argparse.Namespace], Coroutine[Any, Any, int]]


async def open_connection(args: argparse.Namespace, name: str) -> Connection:
    conn = await connect(args.url, name=name, **connect_options(args))
    conn.codec = AesGcmCodec.from_env()  # NATFLOW_CODEC_KEYS: shows and sends sealed values
    return conn


# -- commands ----------------------------------------------------------------------------


async def cmd_init(args: argparse.Namespace) -> int:
    conn = await open_connection(args, "natflow-init")
    try:
        await ensure_streams(conn)
        print("natflow streams are ready")
        return 0
    finally:
        await conn.close()


async def cmd_engine(args: argparse.Namespace) -> int:
    check_site_options(args)
    tune_collector()
    # No codec, whatever NATFLOW_CODEC_KEYS says: the engine never opens a value (it
    # sealed the on_complete outcome it hands on, which its run then could not read).
    conn = await connect(args.url, name="natflow-engine", **connect_options(args))
    serve_metrics(args.metrics_port, args.metrics_host)
    engine = Engine(
        conn,
        metrics_interval=args.metrics_interval,
        nats_monitor=args.nats_monitor,
        retention=args.retention,
        sites=site_list(args.sites),
        site=args.site,
        hub_domain=args.hub_domain,
    )
    try:
        return await until_signalled(engine.run)
    finally:
        await conn.close()


def server_config(given: str | None) -> tuple[Path, str]:
    """The nats-server configuration and where it came from.

    Precedence: ``--config``, then ``NATFLOW_CONFIG``, then ``./nats.conf``, then the
    configuration shipped inside natflow (so ``natflow dev`` runs anywhere).
    """
    for path, source in (
        (given, "--config"),
        (os.environ.get("NATFLOW_CONFIG") or None, "NATFLOW_CONFIG"),
    ):
        if path is not None:
            if not Path(path).is_file():
                raise NatflowError(
                    f"no server configuration at {path} (from {source}); pass the path of a "
                    "nats-server configuration file, or leave it out to use natflow's default"
                )
            return Path(path).resolve(), source
    if Path("nats.conf").is_file():
        return Path("nats.conf").resolve(), "./nats.conf"
    return PACKAGED_CONFIG, "natflow's default"


def _server_for(args: argparse.Namespace) -> tuple[EmbeddedServer, str]:
    config, source = server_config(args.config)
    fast = getattr(args, "fast", False)
    if fast and config != PACKAGED_CONFIG:
        raise NatflowError(
            f"--fast relaxes natflow's own configuration, but {config} ({source}) is in use; "
            "remove `sync_interval: always` from its jetstream block instead, or leave out --fast"
        )
    extra: list[str] = []
    if args.port is not None:
        extra += ["-p", str(args.port or -1)]  # 0: any free port (nats-server says -1)
    if args.http_port is not None:
        extra += ["-m", str(args.http_port or -1)]
    store = args.store_dir
    if store is None and config == PACKAGED_CONFIG:
        store = os.environ.get("NATFLOW_STORE_DIR", ".natflow")
    if store is not None:
        if config != PACKAGED_CONFIG and "store_dir" in config.read_text():
            raise NatflowError(
                f"--store-dir cannot override the store_dir that {config} sets (nats-server "
                "refuses both); change it there, or leave out --store-dir"
            )
        extra += ["-sd", str(Path(store).resolve())]
    cwd = Path.cwd() if config == PACKAGED_CONFIG else config.parent
    # natflow's configuration names no accounts: its streams will be the global account's.
    staged = (GLOBAL_ACCOUNT,) if config == PACKAGED_CONFIG else ()
    if fast:
        assert store is not None  # the packaged configuration always gets one above
        config, source = relaxed_config(Path(store)), f"{source}, relaxed by --fast"
    server = EmbeddedServer(
        config, cwd=cwd, store_dir=store, extra_args=tuple(extra), staged_accounts=staged
    )
    return server, source


_store_locks: list[IO[bytes]] = []  # held until the process exits


def _lock_store(store: Path) -> None:
    """One server per store: nats-server itself would start a second one on the same files."""
    store.mkdir(parents=True, exist_ok=True)
    lock = open(store / "natflow.lock", "ab")  # noqa: SIM115 - held for the process's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise NatflowError(
            f"another natflow dev or server already uses the store {store}; stop it, or pass "
            "--store-dir DIR for a store of its own"
        ) from None
    _store_locks.append(lock)


def _start_server(args: argparse.Namespace) -> EmbeddedServer:
    """Start nats-server and say where it listens, which configuration it read, and where
    it stores data."""
    server, source = _server_for(args)
    if server.store_given:
        _lock_store(server.store_dir)
    try:
        server.start()
    except PortInUse as exc:
        option = "--http-port" if exc.monitor else "--port"
        raise NatflowError(
            f"port {exc.port} is in use ({exc.address}): is another natflow dev or "
            f"nats-server running? Stop it, or pick another port with {option} N "
            "(0: any free port)"
        ) from None
    print(f"natflow {args.command}: nats-server at {server.url}", flush=True)
    print(f"  configuration  {server.config} ({source})")
    print(f"  data           {server.jetstream_dir or 'not reported'} (JetStream store)")
    if server.http_port:
        print(f"  monitoring     http://127.0.0.1:{server.http_port}")
    print(f"  log            {server.log_path}", flush=True)
    return server


async def _print_durability(server: EmbeddedServer) -> Jsz | None:
    """Say what an acknowledged step survives, as the running server reports it (and
    return the report, if the server gave one)."""
    if not server.http_port:
        return None
    try:
        jsz = await read_jsz(f"http://127.0.0.1:{server.http_port}")
    except NatflowError as exc:
        log.warning("cannot tell the durability mode: %s", exc)
        return None
    print(f"  durability     {jsz.durability()}", flush=True)
    return jsz


async def _record_own_sync_mode(server: EmbeddedServer, sync_always: bool) -> None:
    """Record the sync mode of a server on natflow's own configuration (or its --fast
    relaxation) where workers and clients read it, as an engine given --nats-monitor does:
    else a relaxed one would have its history appends batched, which only fsyncs pay for.
    That configuration is one server with no users, so this process may connect to it and
    create natflow's streams; another configuration may hold a cluster node, a leaf or
    users, whose streams are the engine's to create."""
    try:
        conn = await connect(server.url, name="natflow-server")
    except NatflowError as exc:
        log.warning("cannot record the server's sync mode: %s", exc)
        return
    try:
        await record_sync_mode(conn, sync_always)  # says why itself where it cannot
    finally:
        await conn.close()


async def cmd_server(args: argparse.Namespace) -> int:
    server = _start_server(args)
    try:  # a SIGTERM while it says where it listens stops the server too
        jsz = await _print_durability(server)
        if jsz is not None and server_config(args.config)[0] == PACKAGED_CONFIG:
            await _record_own_sync_mode(server, jsz.config.sync_always)
        print("Ctrl-C stops it", flush=True)
        return await until_signalled(lambda: anyio.sleep_forever())
    finally:
        server.cleanup()  # a folder of ours (its log, beside a configuration's own store) too


async def cmd_dev(args: argparse.Namespace) -> int:
    server = _start_server(args)
    tune_collector()
    try:
        await _print_durability(server)
        conn = await connect(server.url, name="natflow-engine")
        port = serve_metrics(args.metrics_port, args.metrics_host)
        monitor = args.nats_monitor or (
            f"http://127.0.0.1:{server.http_port}" if server.http_port else None
        )
        print(f"  {_metrics_where(args.metrics_host, port)}")
        if monitor:
            print(f"  NATS monitoring at {monitor} (JetStream usage read from /jsz)")
        print("  engine running; Ctrl-C stops both", flush=True)
        try:
            return await until_signalled(lambda: _dev_services(conn, args, server.url, monitor))
        finally:
            await conn.close()
    finally:
        server.cleanup()


async def _dev_services(
    conn: Connection, args: argparse.Namespace, url: str, monitor: str | None
) -> None:
    """The engine, and the console unless ``--ui-port 0``."""
    engine = Engine(
        conn, metrics_interval=args.metrics_interval, nats_monitor=monitor, retention=args.retention
    )
    if not args.ui_port:
        await engine.run()
        return
    console_conn = await connect(url, name="natflow-console")
    console_conn.codec = AesGcmCodec.from_env()  # NATFLOW_CODEC_KEYS, as `natflow ui` has it
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                serve_console_if_possible,
                console_conn,
                args.ui_host,
                args.ui_port,
                args.ui_access_token,
                url,
            )
            await engine.run()
    finally:
        await console_conn.close()


def _metrics_where(host: str, port: int | None) -> str:
    """Where a process's metrics are, as a line for people (and Prometheus configs)."""
    if port is None:
        return "metrics not served (--metrics-port 0, or the port is taken: see the log)"
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host  # reachable from this machine
    return f"Prometheus metrics at http://{shown}:{port}/metrics (listening on {host or '*'})"


# -- the parser --------------------------------------------------------------------------

_SECRET_NAMES: Final = ("password", "token")  # options whose value is never shown
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, unless the help says it already, there is
    none, or it is a secret (taken from the environment, never shown)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or "default" in text
            or action.dest.endswith(_SECRET_NAMES)
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, naming the problem and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def log_level(value: str) -> str:
    """argparse type: a logging level name, any case."""
    if value.upper() not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown level {value!r}; use one of {', '.join(n.lower() for n in _LOG_LEVELS)}"
        )
    return value.upper()


def version() -> str:
    try:
        return importlib.metadata.version("natflow")
    except importlib.metadata.PackageNotFoundError:  # run from sources, not installed
        return "unknown"


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="nats-server configuration file (env NATFLOW_CONFIG; default: ./nats.conf if "
        "present, else the one shipped with natflow)",
    )
    p.add_argument(
        "--store-dir",
        metavar="DIR",
        default=None,
        help="where JetStream keeps its data, in DIR/jetstream (env NATFLOW_STORE_DIR; "
        "default: ./.natflow with natflow's configuration, else the configuration's store_dir)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        default=os.environ.get("NATFLOW_FAST", "") not in ("", "0"),
        help="acknowledge before fsync (env NATFLOW_FAST=1): faster, and a step survives a "
        "crash of nats-server but not an OS crash or power loss; only with natflow's own "
        "configuration (README, Durability)",
    )
    p.add_argument(
        "--port",
        metavar="PORT",
        type=port,
        default=None,
        help="client port, 0 for any free one (default: the configuration's, 4222)",
    )
    p.add_argument(
        "--http-port",
        metavar="PORT",
        type=port,
        default=None,
        help="HTTP monitoring port, 0 for any free one (default: the configuration's, 8222)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="natflow",
        description="Durable workflows on NATS JetStream.",
        epilog="Every command takes --help. Start here: `natflow dev`, then "
        "`natflow worker app.py` and `natflow start WORKFLOW --wait`.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"natflow {version()}")
    parser.add_argument(
        "--url",
        metavar="URL",
        default=None,
        help=f"NATS server URL(s), comma-separated (env NATFLOW_URL, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--creds",
        metavar="FILE",
        default=os.environ.get("NATFLOW_CREDS"),
        help="NATS credentials file (env NATFLOW_CREDS)",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        default=os.environ.get("NATFLOW_USER"),
        help="NATS user (env NATFLOW_USER)",
    )
    parser.add_argument(
        "--password",
        metavar="SECRET",
        default=os.environ.get("NATFLOW_PASSWORD"),
        help="NATS password; prefer the env NATFLOW_PASSWORD (never shown)",
    )
    parser.add_argument(
        "--token",
        metavar="SECRET",
        default=os.environ.get("NATFLOW_TOKEN"),
        help="NATS token; prefer the env NATFLOW_TOKEN (never shown)",
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        default=os.environ.get("NATFLOW_TLS_CA"),
        help="CA certificate to verify the server with (env NATFLOW_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("NATFLOW_TLS_CERT"),
        help="client certificate (env NATFLOW_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("NATFLOW_TLS_KEY"),
        help="client certificate's key (env NATFLOW_TLS_KEY)",
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=log_level,
        default=os.environ.get("NATFLOW_LOG_LEVEL", "INFO"),
        help="debug, info, warning, error or critical (env NATFLOW_LOG_LEVEL)",
    )
    parser.add_argument(
        "--nkey",
        metavar="FILE",
        default=os.environ.get("NATFLOW_NKEY"),
        help="NATS NKEY seed file (env NATFLOW_NKEY)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=os.environ.get("NATFLOW_LOG_JSON", "") not in ("", "0"),
        help="log one JSON object per line (env NATFLOW_LOG_JSON=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "dev",
        help="a development server: nats-server plus the engine, in one process",
        description="Start nats-server (the binary natflow installs) and the engine services. "
        "The configuration is --config, else NATFLOW_CONFIG, else ./nats.conf, else the one "
        "shipped with natflow; with that one, data lives in ./.natflow/jetstream.",
    )
    _add_server_options(p)
    add_metrics_options(p, DEFAULT_ENGINE_PORT, "NATFLOW_ENGINE_METRICS_PORT", engine=True)
    add_ui_options(p, prefix="ui-")
    add_retention_option(p)
    p.set_defaults(handler=cmd_dev)

    p = sub.add_parser(
        "server",
        help="nats-server alone, with natflow's configuration (run `natflow engine` beside it)",
    )
    _add_server_options(p)
    p.set_defaults(handler=cmd_server)

    p = sub.add_parser("engine", help="the engine services (dispatcher, run index, timers)")
    add_metrics_options(p, DEFAULT_ENGINE_PORT, "NATFLOW_ENGINE_METRICS_PORT", engine=True)
    add_retention_option(p)
    add_site_options(p)
    p.set_defaults(handler=cmd_engine)

    p = sub.add_parser("init", help="create natflow's streams (optional: done on first use)")
    p.set_defaults(handler=cmd_init)

    runs = register_runs(sub, open_connection)
    register_run_ops(sub, runs, open_connection)
    register_ops(sub, open_connection)
    register_triggers(sub, open_connection)
    register_console(sub, open_connection)
    register_auth(sub)
    for entry in importlib.metadata.entry_points(group="natflow.commands"):
        entry.load()(sub)
    _finish(parser)
    return parser


def _finish(parser: argparse.ArgumentParser) -> None:
    """Every (sub)command gets the help formatter, and its one-line help as description."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                if child.description is None:
                    child.description = helps.get(name)
                _finish(child)


def _quiet_stdout() -> None:
    """After a reader such as `head` closed the pipe: send the rest of stdout nowhere, so
    the interpreter's final flush does not fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # Until a command takes SIGTERM itself (its own handler, once running), SIGTERM unwinds
    # the command as Ctrl-C does, so the `finally` that stops a nats-server or the worker
    # processes it started runs: the default action ends Python on the spot (a `natflow
    # server` signalled while printing where it listens left its nats-server running).
    # Only the main thread may set handlers (tests call main() from worker threads too).
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        _stdio_open()
    before = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return _main(argv)
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _stdio_open() -> None:
    """Give a closed stdin, stdout or stderr ``/dev/null``: else the first socket natflow
    opens takes its descriptor, and uvloop aborts the process on it (``natflow init <&-``
    died with "Assertion 'fd > STDERR_FILENO' failed", exit 134)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found the descriptor closed at its start
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 (for good)


def _text_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an argument holding bytes that are not UTF-8: Python keeps them as lone
    surrogates, which nothing natflow writes can hold (a reason, a payload, a note)."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode()
                except UnicodeEncodeError:
                    shown = name.replace("_", "-")  # not the value: it may be a password
                    parser.error(f"argument {shown}: holds bytes that are not UTF-8 text")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _text_arguments(parser, args)
    configure_logging(args.log_level, json_lines=args.log_json)
    if args.url is None:
        args.url = default_url()
    handler: Handler = args.handler
    try:
        code = run_event_loop(handler(args))
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except NatflowError as exc:
        print(f"natflow {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        waiting = getattr(args, "waiting_for", None)
        if waiting is not None:
            print(f"\nnatflow {args.command}: {interrupted_wait(waiting)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
