"""``natflow ui``: serve the console; also the hook ``natflow dev`` uses to serve it."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from .._cli_bind import Opener
from .._cli_types import port
from .._connection import Connection
from .._errors import NatflowError
from ._app import create_app
from ._serve import DEFAULT_HOST, DEFAULT_PORT, serve

log = logging.getLogger("natflow.console")

TOKEN_ENV = "NATFLOW_UI_TOKEN"


def access_token(value: str) -> str:
    """argparse type: a token that is not empty (argparse checks the env default with it too).

    An empty ``NATFLOW_UI_TOKEN=`` (an unset variable in an env file) made a console that
    ``?token=`` opened, without the no-token warning or the no-token DNS-rebinding check.
    """
    if not value.strip():
        raise argparse.ArgumentTypeError(
            f"the access token is empty; give a real one, or leave the option and {TOKEN_ENV} "
            "unset for a console without one"
        )
    return value


def add_ui_options(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """``--port``/``--host``/``--access-token`` (``--ui-...`` under ``natflow dev``)."""
    dash = f"--{prefix}" if prefix else "--"
    p.add_argument(
        f"{dash}port",
        type=port,
        default=os.environ.get("NATFLOW_UI_PORT", str(DEFAULT_PORT)),
        help=f"console port (env NATFLOW_UI_PORT, default {DEFAULT_PORT}"
        + ("; 0 turns the console off)" if prefix else ")"),
    )
    p.add_argument(
        f"{dash}host",
        default=os.environ.get("NATFLOW_UI_HOST", DEFAULT_HOST),
        help=f"address the console listens on (env NATFLOW_UI_HOST, default {DEFAULT_HOST}: "
        "this machine only)",
    )
    p.add_argument(
        f"{dash}access-token" if not prefix else f"{dash}token",
        dest=f"{prefix.replace('-', '_')}access_token",
        default=os.environ.get(TOKEN_ENV),
        type=access_token,
        help=f"require this token to open the console (env {TOKEN_ENV})",
    )


async def serve_console(
    conn: Connection,
    host: str,
    port: int,
    token: str | None,
    server: str,
    port_option: str = "--port",
) -> None:
    """Serve the console on an open connection until cancelled; ``port_option`` is the
    command's option for ``port``, named should the port be taken."""

    async def opener() -> Connection:
        return conn

    def ready(bound: int) -> None:
        shown = host if host not in ("0.0.0.0", "::") else "127.0.0.1"
        hint = " (open it with ?token=<your access token> once)" if token else ""
        print(f"natflow console at http://{shown}:{bound}/{hint}", flush=True)

    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "the console listens on %s without an access token: anyone who reaches it can "
            "start, signal and cancel runs; pass --access-token (env %s)",
            host,
            TOKEN_ENV,
        )
    app = create_app(opener, token=token, server=server)
    await serve(app, host, port, ready=ready, port_option=port_option)


async def serve_console_if_possible(
    conn: Connection, host: str, port: int, token: str | None, server: str
) -> None:
    """:func:`serve_console` for ``natflow dev``: a console that cannot listen (its port is
    taken) is reported and left out, and the server and engine carry on."""
    try:
        await serve_console(conn, host, port, token, server, port_option="--ui-port")
    except NatflowError as exc:
        log.warning("natflow dev: no console: %s", exc)


def register(sub: Any, opener: Opener) -> None:
    """Add ``natflow ui`` to the ``natflow`` parser."""

    async def ui(args: argparse.Namespace) -> int:
        from .._cli_options import until_signalled

        conn = await opener(args, "natflow-console")
        try:
            return await until_signalled(
                lambda: serve_console(conn, args.host, args.port, args.access_token, str(args.url))
            )
        finally:
            await conn.close()

    p = sub.add_parser("ui", help="serve the web console (runs, workers, dead letters), live")
    add_ui_options(p)
    p.set_defaults(handler=ui)
