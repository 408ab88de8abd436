"""What every natflow process started from the command line shares (connection and metrics
options, running until a signal), kept apart from the ``natflow`` command itself so that a
worker process can take them without loading the engine's commands, the console or their
dependencies."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio

from ._cli_types import port, seconds
from ._error_groups import one_error
from ._errors import NatflowError

log = logging.getLogger("natflow.cli")
T = TypeVar("T")


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats-py connect options from the CLI's credential and TLS flags."""
    options: dict[str, Any] = {}
    for option, path in (
        ("--creds", args.creds),
        ("--tls-ca", args.tls_ca),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
    ):
        if path and not Path(path).is_file():
            raise NatflowError(f"{option} {path}: no such file")
    if args.creds:
        options["user_credentials"] = args.creds
    if getattr(args, "nkey", None):
        options["nkeys_seed"] = args.nkey
    if args.user:
        options["user"] = args.user
        options["password"] = args.password or ""
    if args.token:
        options["token"] = args.token
    if args.tls_ca or args.tls_cert:
        try:
            context = ssl.create_default_context(cafile=args.tls_ca)
        except ssl.SSLError as exc:
            raise NatflowError(
                f"--tls-ca {args.tls_ca}: not a PEM file of CA certificates ({exc.reason or exc})"
            ) from None
        if args.tls_cert:
            try:
                context.load_cert_chain(args.tls_cert, args.tls_key)
            except ssl.SSLError as exc:
                raise NatflowError(
                    f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key or '(in the cert)'}: "
                    f"not a PEM certificate with its private key ({exc.reason or exc})"
                ) from None
        options["tls"] = context
    return options


def add_metrics_options(
    p: argparse.ArgumentParser, default_port: int, env: str, *, engine: bool = False
) -> None:
    """``--metrics-port``/``--metrics-host``: where the process serves Prometheus metrics."""
    p.add_argument(
        "--metrics-port",
        metavar="PORT",
        type=port,
        default=os.environ.get(env, str(default_port)),
        help=f"serve Prometheus metrics on this port, 0 for none (env {env})",
    )
    p.add_argument(
        "--metrics-host",
        metavar="ADDRESS",
        default=os.environ.get("NATFLOW_METRICS_HOST", "127.0.0.1"),
        help="address the metrics endpoint listens on; 0.0.0.0 for every interface "
        "(env NATFLOW_METRICS_HOST)",
    )
    if engine:
        p.add_argument(
            "--metrics-interval",
            metavar="SECONDS",
            type=seconds(at_least=0.1),  # 0 read JetStream in a loop, a core's worth
            default=os.environ.get("NATFLOW_METRICS_INTERVAL", "5"),
            help="seconds between reads of queue, worker and run counts from JetStream "
            "(env NATFLOW_METRICS_INTERVAL)",
        )
        p.add_argument(
            "--nats-monitor",
            default=os.environ.get("NATFLOW_NATS_MONITOR") or None,
            metavar="URL",
            help="nats-server's HTTP monitoring endpoint (its `http:` port, e.g. "
            "http://127.0.0.1:8222): the engine exports JetStream stream usage and limits "
            "from its /jsz (env NATFLOW_NATS_MONITOR; natflow dev: its own server's)",
        )


async def until_interrupted(wait: Awaitable[T]) -> T:
    """``wait``'s outcome, or KeyboardInterrupt at the first SIGINT (Ctrl-C).

    asyncio.run's own SIGINT handling cancels the main task once, and Python 3.11's
    ``asyncio.wait_for`` (inside nats-py's requests and ``next_msg``) loses a cancellation
    that lands as the call it waits on completes: the command then waited on, deaf to the
    Ctrl-C. A cancel scope cancels again until ``wait`` has stopped."""
    interrupted = False
    with one_error():  # the command's error, printed as one line (``natflow_engine._cli``)
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT) as signals:
                    async for _ in signals:
                        interrupted = True
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            outcome = await wait
            tg.cancel_scope.cancel()
    if interrupted:
        raise KeyboardInterrupt
    return outcome


async def until_signalled(main: Callable[[], Awaitable[None]]) -> int:
    """Run ``main`` until SIGINT or SIGTERM; the command's exit status: 130 after Ctrl-C (as
    the README says, and the worker does), else 0."""
    stopped_by: list[int] = []
    with one_error():  # a natflow error as one line, a bug with its traceback
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        log.info("received %s; stopping", signal.Signals(signum).name)
                        stopped_by.append(signum)
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            await main()
            tg.cancel_scope.cancel()
    return 130 if stopped_by == [signal.SIGINT] else 0
