"""Opening a NATS connection natflow's way: where to (``NATFLOW_URL``, ``NATFLOW_DOMAIN``),
how it rides out a lost server (reconnecting forever, pinging a silent link), and what it
says when no server will have it. The :class:`Connection` it returns is ``_connection``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import nats
import nats.errors
from nats.aio.client import Client as NATS

from ._connect_refusals import (
    check_creds_file,
    check_nkey_file,
    control_line_refusal,
    redact_text,
    redact_url,
    refused_credentials,
    tls_refusal,
)
from ._connection import Connection
from ._errors import InvalidInput, PermissionDenied, ServerUnavailable
from ._url_checks import check_schemes, why_unanswered

log = logging.getLogger("natflow.connection")

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
# A link that dies without a word (a firewall or NAT that forgets the connection, a frozen
# middlebox, a cable pulled somewhere between an edge worker and its server) shows only as
# pings unanswered: PING every 10 s, the connection given up after two unanswered, so it is
# noticed within 30 s and reconnected. nats-py's defaults (2 min, two) took up to 6 min, while
# the worker's runs were handed to others after its 15 s lease and it sat idle.
PING_INTERVAL: Final = 10
MAX_OUTSTANDING_PINGS: Final = 2
START_HINT: Final = "start one with `natflow dev` (or `natflow server`), or set NATFLOW_URL"


def default_url() -> str:
    """``NATFLOW_URL``, or the default where it is unset or empty (as every other NATFLOW_
    variable: an empty one said "invalid hostname in connect url")."""
    return os.environ.get("NATFLOW_URL", "").strip() or DEFAULT_URL


async def connect(
    url: str | list[str] | None = None,
    *,
    connect_timeout: float | timedelta = 5.0,
    name: str = "natflow",
    domain: str | None = None,
    **options: Any,
) -> Connection:
    """Connect to NATS, failing with :class:`ServerUnavailable` within ``connect_timeout``.

    ``domain`` (default: ``NATFLOW_DOMAIN``) names the JetStream domain that holds natflow's
    streams, for a process connected to a leaf node whose JetStream, if any, is another.
    """
    if isinstance(connect_timeout, timedelta):  # as every duration natflow takes (API.md)
        connect_timeout = connect_timeout.total_seconds()
    if (
        isinstance(connect_timeout, bool)
        or not isinstance(connect_timeout, int | float)
        or not 0 < connect_timeout <= 3600
    ):
        raise InvalidInput(
            f"connect_timeout must be seconds above 0 (at most an hour), not {connect_timeout!r}"
        )
    servers: str | list[str] = url if url is not None else default_url()
    if isinstance(servers, str) and "," in servers:  # NATFLOW_URL may list a cluster's nodes
        servers = [u.strip() for u in servers.split(",") if u.strip()]
    check_schemes(servers)
    holder: dict[str, Connection] = {}
    refused: list[bool] = []  # whether the server turned the credentials down while connecting
    connecting_errors: list[Exception] = []

    async def error_cb(error: Exception) -> None:
        conn = holder.get("conn")
        if conn is None:  # still connecting: the caller gets the error itself
            refused.append(refused_credentials(error))
            connecting_errors.append(error)
            log.debug("NATS: %s", redact_text(str(error)))
            return
        # A denial a waiting call raises as PermissionDenied is that call's to report (a
        # command printed this warning beside its own one-line error); one nobody waits on
        # (a publish sent without waiting) is only ever seen here.
        level = logging.DEBUG if conn.note_error(error) else logging.WARNING
        log.log(level, "NATS: %s", redact_text(str(error)))

    async def disconnected_cb() -> None:
        conn = holder.get("conn")
        if conn is None:
            return
        if not conn.closing:
            log.warning("NATS connection lost; reconnecting")
        for hook in conn.on_disconnect:
            hook()

    async def reconnected_cb() -> None:
        log.info("NATS connection re-established")
        conn = holder.get("conn")
        for hook in conn.on_reconnect if conn is not None else []:
            hook()

    creds = options.get("user_credentials")
    creds_size = 0
    if isinstance(creds, str | os.PathLike):
        creds_size = check_creds_file(os.fspath(creds))
    seed = options.get("nkeys_seed")
    if isinstance(seed, str | os.PathLike):
        check_nkey_file(os.fspath(seed))
    reconnect_attempts = options.pop("max_reconnect_attempts", -1)
    options.setdefault("reconnect_time_wait", 0.5)
    options.setdefault("ping_interval", PING_INTERVAL)
    options.setdefault("max_outstanding_pings", MAX_OUTSTANDING_PINGS)
    options.setdefault("error_cb", error_cb)
    options.setdefault("disconnected_cb", disconnected_cb)
    options.setdefault("reconnected_cb", reconnected_cb)
    shown = redact_url(servers if isinstance(servers, str) else ", ".join(servers))
    try:
        nc = await asyncio.wait_for(
            nats.connect(
                servers=servers,
                connect_timeout=max(1, round(connect_timeout)),
                allow_reconnect=True,
                # The first connection tries each server twice and fails fast; once
                # connected, the client reconnects as the caller asked (forever by default).
                max_reconnect_attempts=1,
                name=name,
                **options,
            ),
            timeout=connect_timeout,
        )
    except (TimeoutError, OSError, nats.errors.NoServersError, nats.errors.Error) as exc:
        if any(refused) or refused_credentials(exc):
            raise PermissionDenied(
                f"the NATS server at {shown} refused the credentials; check the user and "
                f"password, token, NKey or creds file (the natflow command: --user and "
                f"--password, --token, --nkey, --creds, or NATFLOW_USER, NATFLOW_PASSWORD, "
                f"NATFLOW_TOKEN, NATFLOW_NKEY, NATFLOW_CREDS)"
            ) from None
        # nats-py hides a failed TLS handshake behind "no servers" or a timeout; only its
        # error callback saw the reason.
        uses_tls = "tls" in options or "tls://" in shown
        tls = tls_refusal(shown, [*connecting_errors, exc], uses_tls=uses_tls)
        if tls is not None:
            raise tls from None
        too_long = control_line_refusal(shown, connecting_errors, creds_size)
        if too_long is not None:
            raise too_long from None
        if isinstance(exc, nats.errors.Error) and not isinstance(exc, nats.errors.NoServersError):
            raise ServerUnavailable(
                f"could not connect to NATS at {shown}: {redact_text(str(exc))}"
            ) from None
        reason = await why_unanswered(servers)
        if reason is not None:
            raise ServerUnavailable(f"no NATS server answered at {shown}: {reason}") from None
        raise ServerUnavailable(f"no NATS server answered at {shown}; {START_HINT}") from None
    nc.options["max_reconnect_attempts"] = reconnect_attempts
    conn = Connection(nc, owned=True, domain=domain or os.environ.get("NATFLOW_DOMAIN"))
    holder["conn"] = conn
    return conn


def logged_callbacks(what: str, closing: Callable[[], bool] | None = None) -> dict[str, Any]:
    """nats-py callbacks for a connection natflow opens beside its :class:`Connection` (the
    worker's heartbeat connection, ``what``): its errors logged as a warning line, its losses
    and returns at info. Without them nats-py logs every lost connection as an ERROR with the
    exception, which read as a failure in the logs of a worker that had merely reconnected.
    ``closing`` says whether the owner asked to close it: that disconnect is no loss."""

    async def error_cb(error: Exception) -> None:
        log.warning("NATS (%s): %s", what, redact_text(str(error)))

    async def disconnected_cb() -> None:
        if closing is None or not closing():
            log.info("NATS (%s): connection lost; reconnecting", what)

    async def reconnected_cb() -> None:
        log.info("NATS (%s): connection re-established", what)

    return {
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
    }


def wrap(nc: NATS, domain: str | None = None) -> Connection:
    """Use a connection the caller opened (and will close)."""
    return Connection(nc, owned=False, domain=domain or os.environ.get("NATFLOW_DOMAIN"))
