"""What is wrong with a NATS URL: checked before connecting (a scheme nats-py does not
speak) and after no server answered (a host that does not resolve, a port that speaks HTTP).

Without these, each mistake read "no NATS server answered; start one with `natflow dev`",
which sends a user whose server runs to start a second one.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from typing import Final

from ._connect_refusals import redact_url
from ._errors import InvalidInput

NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")  # what nats-py connects with
PROBE_SECONDS: Final = 1.0  # each look at a failed URL; only taken after a failure
_CLIENT_PORT_HINT: Final = "clients connect to nats-server's client port, 4222 by default"


def check_schemes(servers: str | list[str]) -> None:
    """Refuse a URL whose scheme nats-py would not connect with, naming it."""
    for url in [servers] if isinstance(servers, str) else servers:
        scheme, separator, _ = url.partition("://")
        if separator and scheme not in NATS_SCHEMES:
            hint = ""
            if scheme.lower() in ("http", "https"):
                hint = f" (an http:// URL is nats-server's monitoring port; {_CLIENT_PORT_HINT})"
            raise InvalidInput(
                f"{redact_url(url)} is not a NATS URL: its scheme is {scheme!r}, not nats://, "
                f"tls://, ws:// or wss://{hint}"
            )


async def why_unanswered(servers: str | list[str]) -> str | None:
    """Why no NATS server answered at these URLs, where a quick look can tell; else None."""
    for url in [servers] if isinstance(servers, str) else servers:
        where = _host_port(url)
        if where is not None:
            reason = await _look(*where)
            if reason is not None:
                return reason
    return None


def _host_port(url: str) -> tuple[str, int] | None:
    """Host and port as nats-py reads a nats:// or tls:// URL (or a bare host[:port])."""
    if "://" not in url:
        url = f"nats://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 4222
    except ValueError:
        return None
    if parts.scheme not in ("nats", "tls") or not parts.hostname:
        return None
    return parts.hostname, port


async def _look(host: str, port: int) -> str | None:
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            await asyncio.get_running_loop().getaddrinfo(host, port)
    except socket.gaierror:
        return f"no host named {host!r} is known (a NATS URL reads nats://HOST:PORT)"
    except (TimeoutError, OSError):
        return None
    if await _speaks_http(host, port):
        return f"port {port} answers HTTP, not NATS (the monitoring URL? {_CLIENT_PORT_HINT})"
    return None


async def _speaks_http(host: str, port: int) -> bool:
    # A NATS server greets with INFO before a word is sent; an HTTP server answers a request
    # with "HTTP/". One request, on a port that already failed as NATS.
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET / HTTP/1.0\r\n\r\n")
                return (await reader.read(5)) == b"HTTP/"
            finally:
                writer.close()
    except (TimeoutError, OSError):
        return False
