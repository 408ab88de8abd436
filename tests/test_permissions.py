"""Denied subjects and refused credentials are named at once, and no secret is shown."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from natflow import Client, ConnectionRefused, PermissionDenied
from natflow_engine import redact_url
from natflow_engine._server import EmbeddedServer

CONF = """
listen: 127.0.0.1:-1
jetstream {{ store_dir: "{store}" }}
accounts {{
  APP {{
    jetstream: enabled
    users: [
      {{ user: admin, password: "s3cret-admin" }}
      {{ user: signaller, password: sig, permissions: {{
          publish: {{ allow: ["natflow.signal.>"] }}
          subscribe: {{ allow: ["_INBOX.>"] }} }} }}
      {{ user: infos, password: infos, permissions: {{
          publish: {{ allow: ["$JS.API.STREAM.INFO.>"] }}
          subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    ]
  }}
  NOJS {{ users: [ {{ user: nojs, password: nojs }} ] }}
}}
"""


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    conf = tmp_path / "auth.conf"
    conf.write_text(CONF.format(store=tmp_path / "js"))
    server = EmbeddedServer(conf, store_dir=tmp_path / "logs")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def with_user(url: str, user: str, password: str) -> str:
    return url.replace("nats://", f"nats://{user}:{password}@")


async def quickly(call: Callable[[], Awaitable[Any]]) -> PermissionDenied:
    """The call's PermissionDenied, which must come within 2 s (not a timeout after 30)."""
    with anyio.fail_after(2):
        with pytest.raises(PermissionDenied) as denied:
            await call()
    return denied.value


async def test_a_signaller_is_told_what_was_denied_within_two_seconds(
    auth_server: EmbeddedServer,
) -> None:
    admin = await Client.connect(auth_server.url, user="admin", password="s3cret-admin")
    async with admin:
        await admin.start("anything", 1, run_id="r-1")
    client = await Client.connect(auth_server.url, user="signaller", password="sig")
    async with client:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "start": lambda: client.start("anything", 1, run_id="r-2"),
            "cancel": lambda: client.cancel("r-1"),
            "history": lambda: client.history("r-1"),
            "describe": lambda: client.describe("r-1"),
            "signal": lambda: client.signal("r-1", "go", 1),
            "list": lambda: client.list(),
        }
        for name, call in calls.items():
            error = await quickly(call)
            assert "$js.api.stream.info.natflow_" in str(error), (name, error)


async def test_a_denied_direct_get_is_named_though_the_server_lower_cases_it(
    auth_server: EmbeddedServer,
) -> None:
    """Streams may be looked up; reading a history (a direct get) is denied."""
    admin = await Client.connect(auth_server.url, user="admin", password="s3cret-admin")
    async with admin:
        await admin.start("anything", 1, run_id="r-1")
    client = await Client.connect(auth_server.url, user="infos", password="infos")
    async with client:
        for call in (lambda: client.describe("r-1"), lambda: client.history("r-1")):
            error = await quickly(call)
            assert "$js.api.direct.get.natflow_history" in str(error), error


async def test_an_account_without_jetstream_is_named_at_once(
    auth_server: EmbeddedServer,
) -> None:
    """Not 30 s of "nothing answers on 'stream NATFLOW_HISTORY'" retries: the server says
    JetStream is off for the account, which no retry cures."""
    client = await Client.connect(auth_server.url, user="nojs", password="nojs")
    async with client:
        with anyio.fail_after(5):
            with pytest.raises(ConnectionRefused) as refused:
                await client.start("anything", 1)
    assert "JetStream is not enabled for this NATS account" in str(refused.value)
    assert "jetstream: enabled" in str(refused.value)


async def test_bad_credentials_are_named_and_the_password_is_never_shown(
    auth_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = with_user(auth_server.url, "admin", "wrong-pass")
    with anyio.fail_after(5):
        with pytest.raises(PermissionDenied, match="refused the credentials") as refused:
            await Client.connect(url, connect_timeout=3)
    assert "wrong-pass" not in str(refused.value)
    assert "admin:***@" in str(refused.value)
    good = await Client.connect(with_user(auth_server.url, "admin", "s3cret-admin"))
    async with good:
        assert "s3cret-admin" not in good.connection.url
        assert good.connection.url.startswith("nats://admin:***@")
    assert not [r for r in caplog.records if "wrong-pass" in r.getMessage()]


def test_urls_in_messages_lose_their_secrets() -> None:
    from natflow_engine._connect_refusals import redact_text as _redact_text

    text = "error connecting to nats://admin:pw@127.0.0.1:4222 and tls://tok@h:1"
    assert (
        _redact_text(text)
        == "error connecting to nats://admin:***@127.0.0.1:4222 and tls://***@h:1"
    )


def test_urls_lose_their_secrets() -> None:
    assert redact_url("nats://u:p@h:4222") == "nats://u:***@h:4222"
    assert redact_url("tls://tok3n@h:4222") == "tls://***@h:4222"
    assert redact_url("nats://h:4222") == "nats://h:4222"
    assert redact_url("nats://a:1@h1:1,nats://b:2@h2:2") == "nats://a:***@h1:1,nats://b:***@h2:2"
    # nats-py takes a URL without its scheme as nats://: urlsplit read "alice" as the scheme
    # and redacted nothing (the password was printed in "no NATS server answered at ...")
    assert redact_url("alice:s3cret@127.0.0.1:1") == "alice:***@127.0.0.1:1"
    assert redact_url("tok3n@h:4222") == "***@h:4222"
    assert redact_url("127.0.0.1:4222") == "127.0.0.1:4222"
