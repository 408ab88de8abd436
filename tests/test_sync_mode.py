"""Many runs' history appends are batched where batches pay: the server's sync mode, as the
engine reads it from /jsz, is recorded on the history stream, and every process that
connects after batches its history appends unless the server is recorded as not fsyncing
each write. A batch on a one-replica file stream costs nats-server a temporary file store,
which only the fsyncs it saves pay for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from natflow import Client
from natflow_engine import HISTORY_STREAM, RUNS_STREAM, record_sync_mode
from natflow_engine._append_batch import HISTORY_SENDING, SYNC_ALWAYS, SYNC_INTERVAL, appender
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine._lifecycle import LIFECYCLE_STREAM
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import SYNC_MODE_KEY, ensure_streams
from natflow_engine.events import RunStarted, utcnow

from tests.helpers import wait_for


async def _recorded(client: Client) -> str | None:
    info = await client.connection.jsm.stream_info(HISTORY_STREAM)
    return (info.config.metadata or {}).get(SYNC_MODE_KEY)


@pytest.fixture
async def fresh(nats_server: EmbeddedServer) -> AsyncIterator[list[Client]]:
    """Clients connected later in a test (each reads the streams as it connects)."""
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


async def _connect(url: str, made: list[Client]) -> Client:
    c = await Client.connect(url)
    made.append(c)
    await ensure_streams(c.connection)
    return c


async def _append_many(client: Client, tag: str, count: int) -> None:
    """``count`` new runs' first appends, all at once, through the history store."""
    store = HistoryStore(client.connection)

    async def start(run_id: str) -> None:
        event = RunStarted(id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q")
        await store.append(run_id, event, 0)

    await asyncio.gather(*(start(f"sync-{tag}-{i}") for i in range(count)))


async def test_a_recorded_mode_decides_batching_for_processes_that_connect_after(
    nats_server: EmbeddedServer, client: Client, fresh: list[Client]
) -> None:
    await ensure_streams(client.connection)
    assert await _recorded(client) is None
    assert appender(
        client.connection, HISTORY_STREAM, sending=HISTORY_SENDING
    ).pays  # unknown: as shipped, fsynced

    await record_sync_mode(client.connection, sync_always=False)
    assert await _recorded(client) == SYNC_INTERVAL
    assert not appender(
        client.connection, HISTORY_STREAM, sending=HISTORY_SENDING
    ).pays  # this process at once
    for stream in (RUNS_STREAM, LIFECYCLE_STREAM):  # the engine's: few writers, large batches
        assert appender(client.connection, stream).pays, stream

    relaxed = await _connect(nats_server.url, fresh)
    batcher = appender(relaxed.connection, HISTORY_STREAM, sending=HISTORY_SENDING)
    assert not batcher.pays
    await _append_many(relaxed, "relaxed", 64)
    assert batcher.batches == 0  # each went alone

    await record_sync_mode(relaxed.connection, sync_always=True)
    assert await _recorded(client) == SYNC_ALWAYS
    durable = await _connect(nats_server.url, fresh)
    batcher = appender(durable.connection, HISTORY_STREAM, sending=HISTORY_SENDING)
    assert batcher.pays
    await _append_many(durable, "durable", 64)
    assert batcher.batches > 0


async def test_the_engine_records_the_mode_it_reads_from_the_servers_monitoring(
    tmp_path: Path,
) -> None:
    server = EmbeddedServer(store_dir=tmp_path / "nats", http_port=-1)
    server.start()
    try:
        async with await Client.connect(server.url) as client:
            engine = Engine(client.connection, nats_monitor=f"http://127.0.0.1:{server.http_port}")
            async with anyio.create_task_group() as tg:
                tg.start_soon(engine.run)
                await engine.ready.wait()
                # The fixture's server keeps nats-server's default sync (every 2 minutes).
                assert await wait_for(lambda: _recorded(client), timeout=15) == SYNC_INTERVAL
                tg.cancel_scope.cancel()
    finally:
        server.stop()
