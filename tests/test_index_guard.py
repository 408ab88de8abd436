"""The run index is acknowledged before its fsync; what a power cut takes from it, the engine
rewrites from history after the server's restart (``_index_guard``).

No test can cut the power, so each loses summaries the way a power cut would (gone, or
older than history) and restarts the real server: nats-server draws a new identity at each
start, which is what the guard keys on.
"""

from __future__ import annotations

from itertools import count

import msgspec
import pytest
from natflow import Client
from natflow_engine import DISPATCHERS, Connection, _index_guard
from natflow_engine._history import HistoryStore
from natflow_engine._index import IndexEntry, RunIndex
from natflow_engine._index_guard import (
    DURABLE_AFTER,
    IndexGuard,
    read_checkpoint,
    write_checkpoint,
)
from natflow_engine._lifecycle import LIFECYCLE_STREAM
from natflow_engine._retention import purge
from natflow_engine._server import EmbeddedServer
from natflow_engine._state import new_info
from natflow_engine._streams import (
    HISTORY_STREAM,
    RUNS_STREAM,
    ensure_streams,
    run_level_subject,
    runs_subject,
)
from natflow_engine.events import RunClaimed, RunCompleted, RunStarted, utcnow

from tests.helpers import running_engine, wait_for


async def _completed_run(history: HistoryStore, run: str) -> tuple[RunStarted, int, int]:
    """A run's start, claim and completion in history: the start and its sequences (start,
    last)."""
    start = RunStarted(
        id=f"{run}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    first = await history.append(run, start, 0)
    seq = await history.append(run, RunClaimed(id=f"{run}:2", at=utcnow(), worker="w1"), first)
    end = RunCompleted(id=f"{run}:3", at=utcnow(), result=msgspec.Raw(b'"done"'))
    return start, first, await history.append(run, end, seq)


async def _status(client: Client, run: str) -> str | None:
    info = await RunIndex(client.connection).get(run)
    return None if info is None else info.status


async def _lifecycle_count(client: Client) -> int:
    info = await client.connection.jsm.stream_info(LIFECYCLE_STREAM)
    return int(info.state.messages)


async def _all_acknowledged(conn: Connection) -> bool:
    """Whether the dispatchers acknowledged every event: none comes back to the next engine
    to fold (and to write a summary before the guard rebuilds it)."""
    for name in DISPATCHERS:
        info = await conn.jsm.consumer_info(HISTORY_STREAM, name)
        if info.num_ack_pending or info.num_pending:
            return False
    return True


async def test_summaries_lost_with_the_server_are_rewritten_from_history(
    client: Client, nats_server: EmbeddedServer
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    history = HistoryStore(conn)
    runs = [f"guard-{i}" for i in range(6)]
    made = {}
    async with running_engine(nats_server.url) as engine:
        for run in runs[:3]:
            made[run] = await _completed_run(history, run)
        floor = made[runs[2]][2]  # what the checkpoint says is on disk
        for run in runs[3:]:
            made[run] = await _completed_run(history, run)

        async def all_indexed() -> bool:
            return all([await _status(client, run) == "completed" for run in runs])

        await wait_for(all_indexed, timeout=20, what="every run indexed as completed")
        await wait_for(lambda: _checked(engine.index_guard), what="the guard's first round")
        # A new index: its first round rebuilt what history holds (nothing was missing).
        assert engine.index_guard.repairs == 1
        before = await read_checkpoint(conn)
        assert before is not None and before.server == conn.server_id
    lifecycle = await _lifecycle_count(client)

    # Lost as a power cut loses them: two summaries below the floor and two above it gone,
    # one above it older than its run's history.
    for run in (runs[0], runs[1], runs[3], runs[4]):
        await purge(conn, RUNS_STREAM, runs_subject(run))
    start, start_seq, _ = made[runs[5]]
    stale = IndexEntry(hseq=start_seq, info=new_info(runs[5], start))
    await conn.publish(runs_subject(runs[5]), msgspec.json.encode(stale), None)
    await write_checkpoint(conn, floor, conn.server_id)

    # An engine restarted on the same server: nothing can have been lost, nothing is read.
    async with running_engine(nats_server.url) as engine:
        await wait_for(lambda: _checked(engine.index_guard), what="the guard's first round")
        assert engine.index_guard.repairs == 0
    assert await _status(client, runs[3]) is None

    nats_server.restart()
    async with running_engine(nats_server.url) as engine:
        guard = engine.index_guard

        async def repaired() -> bool:
            return guard.repairs == 1

        await wait_for(repaired, timeout=20, what="the repair after the server's restart")
        assert guard.rewritten == 3
        for run in runs[3:]:
            assert await _status(client, run) == "completed", run
        # Below the checkpoint's floor nothing is looked at: those were on disk.
        assert await _status(client, runs[0]) is None
        assert await _status(client, runs[2]) == "completed"
        after = await read_checkpoint(conn)
        assert after is not None and after.server == conn.server_id != before.server
        assert after.floor == floor
    # Lifecycle events were fsynced before the summaries that were lost: none again.
    assert await _lifecycle_count(client) == lifecycle


async def _checked(guard: IndexGuard) -> bool:
    return guard.checks > 0


async def test_the_checkpoint_takes_a_floor_only_once_it_is_on_disk(client: Client) -> None:
    """A floor noted now becomes the checkpoint DURABLE_AFTER seconds later: nats-server
    fsyncs the index in the background, at least every two minutes."""
    conn = client.connection
    await ensure_streams(conn)
    now = 0.0
    floors = count(100, 100)

    async def ack_floor() -> int:
        return next(floors)

    guard = IndexGuard(conn, RunIndex(conn), ack_floor, clock=lambda: now)
    await guard.check()  # no checkpoint yet: a new index, rebuilt from history (empty here)
    first = await read_checkpoint(conn)
    assert first is not None and first.floor == 0 and first.server == conn.server_id
    assert guard.repairs == 1
    await guard.check()  # noted 100 now
    now = DURABLE_AFTER - 1  # noted 200
    await guard.check()
    assert (await read_checkpoint(conn)).floor == 0  # type: ignore[union-attr]
    now = DURABLE_AFTER  # noted 300; 100 is old enough, 200 not yet
    await guard.check()
    assert (await read_checkpoint(conn)).floor == 100  # type: ignore[union-attr]
    now = 2 * DURABLE_AFTER  # noted 400; 200 and 300 old enough
    await guard.check()
    assert (await read_checkpoint(conn)).floor == 300  # type: ignore[union-attr]
    assert guard.repairs == 1


async def test_a_new_index_is_rebuilt_from_the_whole_history(
    client: Client, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index stream removed (to be created anew, as an upgrade to an unsynced index asks)
    comes back with every run's summary, closed runs' too. History is gone through a page at
    a time (a run's events here span pages)."""
    monkeypatch.setattr(_index_guard, "_READ_PAGE", 2)
    conn = client.connection
    await ensure_streams(conn)
    history = HistoryStore(conn)
    runs = [f"anew-{i}" for i in range(4)]
    async with running_engine(nats_server.url):
        for run in runs:
            await _completed_run(history, run)

        async def all_indexed() -> bool:
            return all([await _status(client, run) == "completed" for run in runs])

        await wait_for(all_indexed, timeout=20, what="every run indexed as completed")

        await wait_for(lambda: _all_acknowledged(conn), what="every event acknowledged")
    await conn.jsm.delete_stream(RUNS_STREAM)  # its checkpoint with it
    conn.streams_ready = False
    async with running_engine(nats_server.url) as engine:
        await wait_for(lambda: _checked(engine.index_guard), what="the guard's first round")
        assert engine.index_guard.rewritten == len(runs)
        for run in runs:
            assert await _status(client, run) == "completed", run


async def test_a_foreign_message_in_a_runs_history_does_not_stop_the_rebuild(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """Whoever may publish on history can store there what natflow cannot decode. The
    dispatcher skips it; a rebuild from history (a new index here) skips it the same way.
    Before, its decode error failed the repair's task group and the engine with it."""
    conn = client.connection
    await ensure_streams(conn)
    history = HistoryStore(conn)
    runs = ["foreign-0", "foreign-1"]
    async with running_engine(nats_server.url):
        for run in runs:
            await _completed_run(history, run)
        await conn.publish(run_level_subject(runs[0]), b"not an event", None)

        async def all_indexed() -> bool:
            return all([await _status(client, run) == "completed" for run in runs])

        await wait_for(all_indexed, timeout=20, what="every run indexed as completed")

        await wait_for(lambda: _all_acknowledged(conn), what="every event acknowledged")
    await conn.jsm.delete_stream(RUNS_STREAM)
    conn.streams_ready = False
    async with running_engine(nats_server.url) as engine:
        await wait_for(lambda: _checked(engine.index_guard), what="the guard's first round")
        assert engine.index_guard.repairs == 1
        assert engine.index_guard.rewritten == len(runs)
        for run in runs:
            assert await _status(client, run) == "completed", run
