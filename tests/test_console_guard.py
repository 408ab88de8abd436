"""The console's guard against visitors it should not trust: no NATS password on any page,
and no server name for a visitor without the token.

Over HTTP against a real nats-server, with the console in this process.
"""

from __future__ import annotations

from natflow_engine._server import EmbeddedServer

from tests.console_helpers import http, served_console

TOKEN = "guard-token-123"


def _with_password(url: str) -> str:
    """``url`` with a user and password (a server without auth accepts any)."""
    return url.replace("nats://", "nats://admin:S3cretPassw0rd@", 1)


async def test_pages_show_the_nats_url_without_its_password(nats_server: EmbeddedServer) -> None:
    """The header showed the NATS URL as given, password included, on every page; the 401
    page showed it to anyone. Now pages show ``admin:***@``, and a refusal no server."""
    url = _with_password(nats_server.url)
    async with served_console(url, token=TOKEN) as base:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/runs", "/workers", "/nowhere"):
            _, body, _ = await http(base + path, headers=bearer)
            assert "S3cretPassw0rd" not in body, path
            assert "nats://admin:***@127.0.0.1" in body, path
        got, body, _ = await http(base + "/runs")
        assert got == 401 and "S3cretPassw0rd" not in body
        assert "127.0.0.1:" + str(nats_server.port) not in body, "no server for a stranger"
    async with served_console(url) as base:  # no token: a rebinding site is refused
        got, body, _ = await http(base + "/runs", headers={"Host": "evil.example"})
        assert got == 400 and "S3cretPassw0rd" not in body
        assert "127.0.0.1:" + str(nats_server.port) not in body
