"""The console while NATS is away: every page answers in seconds with what is wrong (NATS
down: a 504 that says the connection is reconnecting; no JetStream: a 503 that says how to
enable it), never after 30 s of retries and never as "natflow could not do that".

Against a real nats-server (stopped mid-test), and one started without JetStream.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from natflow import Client
from natflow_engine._server import EmbeddedServer

from tests.console_helpers import http, served_console
from tests.helpers import running_worker, wait_for
from tests.workflows_console import WORKFLOWS, greet

PAGES = ["/runs", "/runs/hello", "/runs?status=completed", "/workers", "/dead-letters", "/start"]


async def _page(url: str) -> tuple[int, str, str, float]:
    """Status, title, message and seconds taken of a console page."""
    began = time.monotonic()
    status, body, _ = await http(url)
    title = re.search(r"<h1[^>]*>(.*?)</h1>", body, re.S)
    message = re.search(r'class="message">(.*?)</p>', body, re.S)
    text = message[1].replace("&#39;", "'") if message else ""
    return status, title[1].strip() if title else "", text, time.monotonic() - began


async def test_pages_during_an_outage_say_nats_is_down_within_seconds(
    nats_server: EmbeddedServer, engine: object, client: Client
) -> None:
    """Stop the server under a running console: each page took ~33 s and then said
    "natflow could not do that" (502); now it answers 504 "NATS did not answer in time" in
    about 5 s, naming the connection as down."""
    async with running_worker(client, WORKFLOWS, queue="console"):
        await (await client.start(greet, {"name": "Ada"}, run_id="hello")).result(timeout=20)
    async with served_console(nats_server.url) as base:
        assert (await _page(base + "/runs/hello"))[0] == 200
        nats_server.stop()
        try:
            for path in ("/runs/hello", "/workers"):
                status, title, message, took = await _page(base + path)
                assert (status, title) == (504, "NATS did not answer in time"), (path, message)
                assert "the NATS connection is down" in message and took < 12, (path, took)
        finally:
            nats_server.start()  # back, for the engine and the client to close cleanly

        async def back() -> bool:
            return (await _page(base + "/runs/hello"))[0] == 200

        await wait_for(back, what="the console to answer again")


async def test_pages_without_jetstream_say_how_to_enable_it(tmp_path: Path) -> None:
    """Against a server without JetStream, /runs said only "nothing answers on
    '$JS.API.STREAM.INFO.NATFLOW_RUNS'" (a 502) and other pages took ~29 s; now every page
    is a 503 "JetStream does not answer" with the hint, in a few seconds."""
    config = tmp_path / "plain.conf"
    config.write_text("listen: 127.0.0.1:-1\n")  # no `jetstream {}`
    server = EmbeddedServer(config).start()
    try:
        async with served_console(server.url) as base:
            for path in PAGES:
                status, title, message, took = await _page(base + path)
                assert (status, title) == (503, "JetStream does not answer"), (path, message)
                assert "is it enabled on the server (`jetstream {}`" in message, (path, message)
                assert took < 12, (path, took)
    finally:
        server.stop()
