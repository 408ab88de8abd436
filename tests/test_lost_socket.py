"""A publish that finds its socket closed before nats-py noticed (a server killed
mid-publish, on uvloop as workers run) is a lost connection, :class:`ServerUnavailable`,
which appends retry; not uvloop's RuntimeError, which failed a step's recorded outcome for
good and ran the step again (the cluster failover test, with a leader killed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import anyio
import pytest
from natflow_engine._append_batch import Batcher, _Append
from natflow_engine._connection import Connection, connect
from natflow_engine._errors import ServerUnavailable
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_PREFIX, HISTORY_STREAM, ensure_streams

# How far the socket's end went: closing (the write is taken, nats-py's drain then fails:
# ConnectionResetError), or closed once the loop ran (uvloop refuses the write itself:
# RuntimeError, as in the failover test's worker).
ENDS = pytest.mark.parametrize("closed", [False, True], ids=["closing", "closed"])


def _on_uvloop(url: str, closed: bool, body: Callable[[Connection], Awaitable[None]]) -> None:
    async def main() -> None:
        conn = await connect(url)
        try:
            await ensure_streams(conn)
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
