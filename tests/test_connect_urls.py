"""A wrong NATS URL is named for what is wrong with it, not answered with "start a server":
a scheme nats-py does not speak, a host that does not exist, a port that speaks HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from natflow import Client, InvalidInput
from natflow_engine import ServerUnavailable
from natflow_engine._server import EmbeddedServer

from tests.links import free_port
from tests.test_cli import assert_one_clear_error, natflow


@pytest.fixture
def monitored(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A nats-server with its HTTP monitoring port open."""
    server = EmbeddedServer(store_dir=tmp_path / "nats", http_port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_a_url_of_another_scheme_is_named_before_connecting(
    monitored: EmbeddedServer,
) -> None:
    client_port = monitored.url.rsplit(":", 1)[1]
    url = f"http://ada:sekrit@127.0.0.1:{client_port}"  # the right port, the wrong scheme
    with pytest.raises(InvalidInput) as caught:
        await Client.connect(url)
    message = str(caught.value)
    assert "is not a NATS URL: its scheme is 'http', not nats://" in message
    assert "monitoring port" in message and "sekrit" not in message
    proc = await natflow(url, "runs", "list")
    line = assert_one_clear_error(proc, "its scheme is 'http'")
    assert "sekrit" not in line and "natflow dev" not in line


async def test_a_port_that_speaks_http_is_named_as_not_nats(monitored: EmbeddedServer) -> None:
    url = f"nats://ada:sekrit@127.0.0.1:{monitored.http_port}"
    with pytest.raises(ServerUnavailable) as caught:
        await Client.connect(url, connect_timeout=1)
    message = str(caught.value)
    assert f"port {monitored.http_port} answers HTTP, not NATS (the monitoring URL?" in message
    assert "sekrit" not in message and "natflow dev" not in message


async def test_a_host_that_does_not_exist_is_named() -> None:
    with pytest.raises(ServerUnavailable) as caught:
        await Client.connect("no-such-host.invalid", connect_timeout=1)
    assert "no host named 'no-such-host.invalid' is known" in str(caught.value)


async def test_nothing_listening_still_says_how_to_start_a_server() -> None:
    with pytest.raises(ServerUnavailable, match="start one with `natflow dev`"):
        await Client.connect(f"nats://127.0.0.1:{free_port()}", connect_timeout=1)


def test_an_empty_natflow_url_is_the_default_as_any_empty_natflow_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It was taken as the URL: "could not connect to NATS at : nats: invalid hostname"."""
    from natflow_engine._connect import DEFAULT_URL, default_url

    monkeypatch.setenv("NATFLOW_URL", "")
    assert default_url() == DEFAULT_URL
    monkeypatch.setenv("NATFLOW_URL", "nats://example:4222")
    assert default_url() == "nats://example:4222"
