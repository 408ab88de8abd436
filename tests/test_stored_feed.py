"""The stored feed: nats-server republishes each run-level event on
``natflow.stored.<run_id>`` once the history stream has stored it (``RunHandle.result``
takes a final event heard there as the outcome, with no read to confirm it)."""

from __future__ import annotations

import anyio
from natflow import Client
from natflow_engine import HISTORY_STREAM, ensure_streams, stored_feed, stored_subject
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import run_level_subject
from nats.aio.msg import Msg

from tests.helpers import add_older_stream


async def test_only_what_the_stream_stored_is_heard(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    assert stored_feed(conn)
    heard: list[Msg] = []
    got = anyio.Event()

    async def on_msg(msg: Msg) -> None:
        heard.append(msg)
        got.set()

    await conn.nc.subscribe(stored_subject("feed-1"), cb=on_msg)
    await conn.nc.flush()
    subject = run_level_subject("feed-1")
    stale = {"Nats-Expected-Last-Subject-Sequence": "999"}
    await conn.nc.publish(subject, b'{"refused": true}', headers=stale)  # a fenced writer's
    ack = await conn.js.publish(subject, b'{"stored": true}')
    await conn.js.publish("natflow.history.feed-1.step", b'{"step": true}')  # not run-level
    with anyio.fail_after(5):
        await got.wait()
    await conn.nc.flush()
    assert [m.data for m in heard] == [b'{"stored": true}']
    headers = heard[0].headers or {}
    assert headers["Nats-Sequence"] == str(ack.seq)
    assert headers["Nats-Subject"] == subject


async def test_an_older_history_stream_gets_the_stored_feed_in_place(
    nats_server: EmbeddedServer,
) -> None:
    """A store created by a natflow before the stored feed: ensure_streams adds the
    republish to its history stream in place (messages kept)."""
    client = await Client.connect(nats_server.url)
    try:
        conn = client.connection
        await add_older_stream(client, HISTORY_STREAM, republish=None)
        await conn.js.publish(run_level_subject("kept-1"), b"{}")
        await ensure_streams(conn)
        info = await conn.jsm.stream_info(HISTORY_STREAM)
        assert info.config.republish is not None
        assert info.config.republish.dest == "natflow.stored.{{wildcard(1)}}"
        assert info.state.messages == 1
        assert stored_feed(conn)
    finally:
        await client.close()


async def test_a_history_stream_that_republishes_elsewhere_is_left_as_it_is(
    nats_server: EmbeddedServer,
) -> None:
    """An operator's own republish is not overwritten; result() then listens on the
    run-level subject, as on an older stream."""
    from nats.js import api

    client = await Client.connect(nats_server.url)
    try:
        conn = client.connection
        theirs = api.RePublish(src="natflow.history.>", dest="audit.>")
        await add_older_stream(client, HISTORY_STREAM, republish=theirs)
        await ensure_streams(conn)
        info = await conn.jsm.stream_info(HISTORY_STREAM)
        assert info.config.republish is not None
        assert info.config.republish.dest == "audit.>"
        assert not stored_feed(conn)
    finally:
        await client.close()
