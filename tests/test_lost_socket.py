"""A publish that finds its socket closed before nats-py noticed (a server killed
mid-publish, on uvloop as workers run) is a lost connection, :class:`ServerUnavailable`,
which appends retry; not uvloop's RuntimeError, which failed a step's recorded outcome for
good and ran the step again (the cluster failover test, with a leader killed). Every other
core publish (reads, pull requests, fire-and-forget deletes, wake-ups, replies) says the
same, and an acknowledgement lost that way is logged, not raised past the loop that made it
(an engine's dispatcher lane, a worker's task loop)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from natflow_engine._append_batch import Batcher, _Append
from natflow_engine._connect import connect
from natflow_engine._connection import (
    Connection,
    JetStreamError,
    RequestTimeout,
    quietly,
    retry_deadline,
)
from natflow_engine._errors import ServerUnavailable
from natflow_engine._index import RunIndex
from natflow_engine._kv import kv_delete_nowait
from natflow_engine._leases import LEASES_BUCKET
from natflow_engine._reader import reader
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_PREFIX, HISTORY_STREAM, ensure_streams
from natflow_engine._tasks import Task, send_start_task

from tests.helpers import wait_for

# How far the socket's end went: closing (the write is taken, nats-py's drain then fails:
# ConnectionResetError), or closed once the loop ran (uvloop refuses the write itself:
# RuntimeError, as in the failover test's worker).
ENDS = pytest.mark.parametrize("closed", [False, True], ids=["closing", "closed"])


def _on_uvloop(
    url: str,
    closed: bool,
    body: Callable[[Connection], Awaitable[None]],
    ready: Callable[[Connection], Awaitable[object]] | None = None,
) -> None:
    async def main() -> None:
        conn = await connect(url)
        try:
            await ensure_streams(conn)
            if ready is not None:  # what the connection holds before it is lost
                await ready(conn)
            # nats-py as it is while it takes a lost connection in: its flusher task stopped,
            # so a publish writes to the socket itself (the failover test's worker failed
            # there), and the socket gone before its reader has seen the end of it.
            flusher = conn.nc._flusher_task
            assert flusher is not None
            flusher.cancel()
            with contextlib.suppress(BaseException):
                await flusher
            conn.nc._transport._io_writer.transport.close()  # type: ignore[union-attr]
            if closed:
                await asyncio.sleep(0)  # one turn of the loop: not yet nats-py's reader's
            await body(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.nc.close()

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})


@ENDS
def test_a_request_on_a_socket_closed_under_nats_py_is_a_lost_connection(
    nats_server: EmbeddedServer, closed: bool
) -> None:
    async def body(conn: Connection) -> None:
        with pytest.raises(ServerUnavailable, match="lost the NATS connection"):
            await conn.publish(f"{HISTORY_PREFIX}.lost.1", b"{}", {}, timeout=2)

    _on_uvloop(nats_server.url, closed, body)


@ENDS
def test_a_batch_whose_socket_closed_leaves_its_writes_to_go_alone(
    nats_server: EmbeddedServer, closed: bool
) -> None:
    async def body(conn: Connection) -> None:
        batcher = Batcher(conn, HISTORY_STREAM)
        batch = [_Append(f"{HISTORY_PREFIX}.lostb{n}.1", b"{}", {}) for n in range(10)]
        assert await batcher._atomic(batch, 2) is None  # each alone, through its retries
        assert batcher.batches == 0

    _on_uvloop(nats_server.url, closed, body)


def _read(conn: Connection) -> Awaitable[object]:
    return reader(conn).get(HISTORY_STREAM, 1)


# Each a publish that waits for no answer from JetStream, made the moment the socket is gone.
SENDS: dict[str, Callable[[Connection], Awaitable[object]]] = {
    "send": lambda conn: conn.send(f"{HISTORY_PREFIX}.lost.1", b"{}"),
    "direct get": _read,
    "kv delete, not waited for": lambda conn: kv_delete_nowait(conn, LEASES_BUCKET, "lost"),
}


@ENDS
@pytest.mark.parametrize("op", list(SENDS), ids=list(SENDS))
def test_a_publish_waiting_for_no_answer_on_a_lost_socket_is_a_lost_connection(
    nats_server: EmbeddedServer, closed: bool, op: str
) -> None:
    async def body(conn: Connection) -> None:
        with pytest.raises(ServerUnavailable, match="lost the NATS connection"):
            await SENDS[op](conn)

    # A direct get's reply inbox is subscribed to on first use: before the loss here.
    _on_uvloop(nats_server.url, closed, body, ready=_read)


@ENDS
def test_an_acknowledgement_on_a_lost_socket_is_logged_not_raised(
    nats_server: EmbeddedServer, closed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(conn: Connection) -> None:
        caplog.set_level(logging.DEBUG, logger="natflow.connection")
        assert not await quietly(conn.nc.publish("$JS.ACK.lost", b"+ACK"), "ack of #7")
        assert "ack of #7 failed" in caplog.text

    _on_uvloop(nats_server.url, closed, body)


@ENDS
def test_a_start_task_lost_with_the_socket_is_left_to_the_engine(
    nats_server: EmbeddedServer, closed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(conn: Connection) -> None:
        await send_start_task(conn, "default", Task(run_id="lost-1", workflow="w"))
        assert "run lost-1: its task was not sent" in caplog.text

    _on_uvloop(nats_server.url, closed, body)


def test_quietly_still_raises_a_bug() -> None:
    async def broken() -> None:
        raise RuntimeError("not a lost connection")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="not a lost connection"):
            await quietly(broken())

    anyio.run(main)


async def test_what_waits_for_a_killed_servers_answer_fails_at_once(
    nats_server: EmbeddedServer,
) -> None:
    """A request's answer comes back over the connection it went out on: once the server
    is gone, none will. An append and a direct get taken by a server that then dies fail as
    a lost connection (retried) the moment nats-py sees the connection go; before, each
    waited out its timeout (an append's 5 s) after the server was back."""
    conn = await connect(nats_server.url)
    try:
        await ensure_streams(conn)
        read = reader(conn)
        await read.get(HISTORY_STREAM, 1)  # its reply inbox subscribed
        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)  # takes both, answers neither
        failed: dict[str, BaseException] = {}
        both = anyio.Event()

        async def waits(name: str, call: Awaitable[object]) -> None:
            try:
                await call
            except Exception as exc:
                failed[name] = exc
            if len(failed) == 2:
                both.set()

        async def both_out() -> bool:
            return bool(conn.nc._resp_map) and bool(read._reads)

        append = conn.publish(f"{HISTORY_PREFIX}.gone.1", b"{}", {}, timeout=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waits, "append", append)
            tg.start_soon(waits, "read", read.get(HISTORY_STREAM, 1))
            await wait_for(both_out, what="the append and the read on their way")
            nats_server.kill()  # SIGKILL, stopped or not
            with anyio.fail_after(4):  # well inside the read's 5 s and the append's 60 s
                await both.wait()
        assert isinstance(failed["append"], ServerUnavailable), failed
        assert isinstance(failed["read"], ServerUnavailable), failed
    finally:
        nats_server.start()
        await conn.nc.close()


async def test_the_run_index_unreadable_is_an_error_not_an_empty_index(
    nats_server: EmbeddedServer,
) -> None:
    """`runs list`, `Client.list` and the console read the run index; a server that does
    not answer is a transient error to show or retry, not "no runs" (it was read as no
    index yet). A missing index still is no runs."""
    conn = await connect(nats_server.url)
    index = RunIndex(conn)
    try:
        assert await index.page() == ([], 0, None)  # no streams yet: no runs yet
        await ensure_streams(conn)
        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        # A list rides out a short outage (an election); past its patience, the error.
        patience = retry_deadline.set(time.monotonic() + 3)
        try:
            with pytest.raises((RequestTimeout, ServerUnavailable), match="NATFLOW_RUNS"):
                await index.page()
        finally:
            retry_deadline.reset(patience)
            os.kill(nats_server.proc.pid, signal.SIGCONT)
    finally:
        await conn.nc.close()


async def test_writes_past_the_reconnect_buffer_are_a_lost_connection(
    nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While the server is away nats-py keeps what is written for the reconnect, up to its
    buffer (2 MiB); past that it refuses the write. A worker busy through a long outage
    meets that refusal: it is the server away (retried, the run handed back), not a raw
    nats-py error, which counted toward parking the run."""
    conn = await connect(nats_server.url)
    lost = anyio.Event()
    conn.on_disconnect.append(lost.set)
    try:
        await ensure_streams(conn)
        nats_server.kill()
        with anyio.fail_after(10):
            await lost.wait()
        chunk = b"x" * 256 * 1024
        with pytest.raises(ServerUnavailable, match="lost the NATS connection"):
            for _ in range(64):  # 16 MiB at most: the buffer is full well before
                await conn.send(f"{HISTORY_PREFIX}.buffered.1", chunk)
        with pytest.raises(ServerUnavailable, match="lost the NATS connection"):
            await conn.publish(f"{HISTORY_PREFIX}.buffered.1", chunk, {}, timeout=2)
        # That request's answer was awaited by no one (nats-py refused it after making it):
        # failed at the next loss of the connection, it is not logged as unretrieved.
        assert conn.nc._resp_map
        nats_server.start()

        async def back() -> bool:
            return bool(conn.nc.is_connected)

        await wait_for(back, timeout=10, what="the connection back")
        lost = anyio.Event()
        conn.on_disconnect.append(lost.set)
        nats_server.kill()
        with anyio.fail_after(10):
            await lost.wait()
        assert not conn.nc._resp_map
        gc.collect()
        assert "never retrieved" not in caplog.text
    finally:
        if nats_server.proc is None or nats_server.proc.poll() is not None:
            nats_server.start()
        await conn.close()  # its full buffer cannot all go: closed all the same, no error


def test_a_write_refused_for_lack_of_storage_is_retried_not_failed(tmp_path: Path) -> None:
    """A server out of JetStream storage refuses writes ("insufficient resources") until
    space is freed (retention deletes closed runs) or its limit raised: the server away for
    now, retried, not a refusal that a worker counted toward parking the run."""

    async def main(conn: Connection) -> None:
        await ensure_streams(conn)
        chunk = b"x" * 200 * 1024
        with pytest.raises(ServerUnavailable, match="lack of storage") as refused:
            for n in range(100):  # 20 MB at most: refused well before
                await conn.publish(f"{HISTORY_PREFIX}.full{n}.step", chunk, None)
        assert "then try again" in str(refused.value)  # what a caller it reaches can do

    _on_server(tmp_path, 'jetstream { store_dir: "{store}", max_file_store: 4MB }', main)


def test_an_account_limit_on_streams_is_named_not_a_nats_traceback(tmp_path: Path) -> None:
    """An account allowed fewer streams than natflow makes: the engine, workers and the CLI
    died of nats.js.errors.BadRequestError (10027, "maximum number of streams reached")."""

    async def main(conn: Connection) -> None:
        with pytest.raises(JetStreamError, match="max_streams"):
            await ensure_streams(conn)

    config = (
        'jetstream { store_dir: "{store}" }\n'
        "accounts { APP: { jetstream: { max_streams: 3, max_consumers: 50 }, "
        "users: [ { user: app, password: apppw } ] } }\n"
    )
    _on_server(tmp_path, config, main)


def test_large_values_move_on_a_server_whose_max_payload_is_small(tmp_path: Path) -> None:
    """nats-py writes 128 KiB chunks, and values up to 64 KiB stayed inline: with a max
    payload of 64 KiB, every value over it was refused (maximum payload exceeded)."""
    from natflow_engine._values import inline_limit, load_value, store_value

    async def main(conn: Connection) -> None:
        await ensure_streams(conn)
        assert inline_limit(conn) == 16 * 1024
        for size in (40_000, 300_000):
            data = b'"' + b"v" * size + b'"'
            ref = await store_value(conn, "a value", data, "small-payload")
            assert ref != data and await load_value(conn, ref) == data

    _on_server(tmp_path, 'max_payload: 65536\njetstream { store_dir: "{store}" }', main)


def test_failures_of_one_kind_are_warned_of_once_in_a_while() -> None:
    """With the store full, the engine logged a warning per run it could not enqueue and per
    timer it could not fire: 30 to 72 lines a second."""
    import logging

    from natflow_engine._log_repeats import level_for

    levels = [level_for("test kind", window=60.0) for _ in range(50)]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 49
    assert level_for("another kind") == logging.WARNING
    assert level_for("test kind", window=0.0) == logging.WARNING  # the window passed


def _on_server(tmp_path: Path, config: str, main: Callable[[Connection], Awaitable[None]]) -> None:
    """Run ``main`` on a connection to a server of this configuration (``{store}``: a store
    folder of the test's); the URL's user and password are ``app``/``apppw`` where the
    configuration has accounts."""
    conf = tmp_path / "server.conf"
    conf.write_text("listen: 127.0.0.1:-1\n" + config.replace("{store}", str(tmp_path / "js")))

    async def connected(port: int) -> None:
        auth = "app:apppw@" if "accounts" in config else ""
        conn = await connect(f"nats://{auth}127.0.0.1:{port}")
        try:
            await main(conn)
        finally:
            await conn.nc.close()

    with EmbeddedServer(conf, store_dir=tmp_path / "log") as server:
        anyio.run(connected, server.port)
