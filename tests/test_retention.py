"""Deleting closed runs (``client.delete``, ``natflow runs delete``) and retention."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import anyio
import msgspec
import pytest
from natflow import Client, NatflowError, RunNotFound, WorkflowContext, workflow
from natflow_engine._cli import main as cli_main
from natflow_engine._connection import Connection
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine._index import IndexEntry, RunIndex
from natflow_engine._retention import RetentionService, purge
from natflow_engine._server import EmbeddedServer
from natflow_engine._state import RunInfo
from natflow_engine._streams import RUNS_STREAM, ensure_streams, runs_subject
from natflow_engine.events import utcnow

from tests.helpers import dispatcher_caught_up, running_worker, wait_for

# Streams that hold nothing of any run once its runs are deleted (the worker registry does).
RUN_STREAMS = (
    "NATFLOW_HISTORY",
    "NATFLOW_TASKS",
    "NATFLOW_RUNS",
    "NATFLOW_SIGNALS",
    "NATFLOW_DEADLETTER",
    "NATFLOW_LIFECYCLE",
    "KV_natflow_leases",
    "KV_natflow_timers",
)


@workflow(name="chatty")
async def chatty(ctx: WorkflowContext, n: int) -> int:
    await ctx.step("one", lambda: 1)
    await ctx.sleep("nap", 0.01)
    if n >= 0:
        return n
    return int(await ctx.wait_for_signal("go", timeout=3600))


@workflow(name="kept", retention=3600)
async def kept(ctx: WorkflowContext) -> str:
    return "kept"


@workflow(name="brief", retention=1)
async def brief(ctx: WorkflowContext) -> str:
    return "brief"


@asynccontextmanager
async def engine_with(url: str, retention: float | None) -> AsyncIterator[Engine]:
    own = await Client.connect(url)
    service = Engine(own.connection, retention=retention)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(service.run)
            await service.ready.wait()
            yield service
            tg.cancel_scope.cancel()
    finally:
        await own.connection.nc.close()


async def stored(client: Client) -> dict[str, int]:
    found = {}
    for name in RUN_STREAMS:
        found[name] = (await client.connection.jsm.stream_info(name)).state.messages
    return found


async def test_delete_removes_every_trace_of_a_closed_run_and_refuses_an_open_one(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [chatty]):
        baseline = None
        await client.start(chatty, 5, run_id="warm-up")  # creates the queue's consumer
        await client.handle("warm-up").result(timeout=20)
        await wait_for(lambda: dispatcher_caught_up(client), what="the engine")
        await client.delete("warm-up")
        baseline = await stored(client)
        handle = await client.start(chatty, -1, run_id="gone")

        async def waiting() -> bool:
            return (await handle.status()).status == "waiting"

        await wait_for(waiting, what="the run to wait for its signal")
        with pytest.raises(NatflowError, match="cancel it first"):
            await client.delete("gone")
        await client.signal("gone", "go", 7)
        assert await handle.result(timeout=20) == 7
        await wait_for(lambda: dispatcher_caught_up(client), what="the engine")
        assert (await stored(client)) != baseline
        await client.delete("gone")
    with pytest.raises(RunNotFound):
        await client.describe("gone")
    assert await client.list() == []
    assert await stored(client) == baseline
    with pytest.raises(RunNotFound):
        await client.delete("gone")


async def test_cli_deletes_a_closed_run(
    client: Client, engine: Engine, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [kept]):
        await client.start(kept, run_id="by-cli")
        await client.handle("by-cli").result(timeout=20)
        await client.start(kept, run_id="by-cli-2")
        await client.handle("by-cli-2").result(timeout=20)
    code = await anyio.to_thread.run_sync(
        cli_main, ["--url", nats_server.url, "runs", "delete", "by-cli"]
    )
    assert code == 0
    with pytest.raises(RunNotFound):
        await client.describe("by-cli")
    # One it cannot delete is named, and the rest are still deleted (it stopped at the first).
    code = await anyio.to_thread.run_sync(
        cli_main, ["--url", nats_server.url, "runs", "delete", "nope", "by-cli-2", "by-cli-2"]
    )
    assert code == 1
    with pytest.raises(RunNotFound):
        await client.describe("by-cli-2")


async def test_retention_deletes_closed_runs_and_leaves_open_ones(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with (
        engine_with(nats_server.url, retention=2.0) as engine,
        running_worker(client, [chatty, kept]),
    ):
        for i in range(3):
            await client.start(chatty, i, run_id=f"short-{i}")
        await client.start(kept, run_id="long-kept")
        await client.start(chatty, -1, run_id="open")
        for run_id in ("short-0", "short-1", "short-2", "long-kept"):
            await client.handle(run_id).result(timeout=20)
        closed_at = time.monotonic()

        async def short_runs_gone() -> bool:
            for i in range(3):
                try:
                    await client.describe(f"short-{i}")
                    return False
                except RunNotFound:
                    pass
            return True

        await wait_for(short_runs_gone, timeout=15, what="retention to delete them")
        assert time.monotonic() - closed_at >= 1.5  # not before their retention
        assert (await client.describe("open")).status == "waiting"
        assert (await client.describe("long-kept")).status == "completed"
        assert engine.retention.deleted >= 3
        await client.cancel("open")


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_storage_is_back_at_its_baseline_after_deleting_many_runs(
    client: Client, engine: Engine
) -> None:
    """NATFLOW_DELETE_RUNS runs (default 500; the acceptance's figure is 10,000, which takes
    most of an hour on a 2-core box shared with other work): all deleted, storage back at
    its baseline."""
    count = int(os.environ.get("NATFLOW_DELETE_RUNS", "500"))
    async with running_worker(client, [chatty], max_concurrent_runs=200):
        await client.start(chatty, 0, run_id="warm-up")
        await client.handle("warm-up").result(timeout=20)
        await wait_for(lambda: dispatcher_caught_up(client), what="the engine")
        await client.delete("warm-up")
        baseline = await stored(client)
        began = time.monotonic()
        starting = anyio.CapacityLimiter(64)

        async def start(i: int) -> None:
            async with starting:
                await client.start(chatty, i, run_id=f"many-{i}")

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(start, i)
        for i in range(count):
            await client.handle(f"many-{i}").result(timeout=600)
        ran = time.monotonic() - began
    await wait_for(lambda: dispatcher_caught_up(client), timeout=600, what="the engine")
    full = await stored(client)
    began = time.monotonic()
    limiter = anyio.CapacityLimiter(16)

    async def delete(run_id: str) -> None:
        async with limiter:
            await client.delete(run_id)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(delete, f"many-{i}")
    deleted = time.monotonic() - began
    print(f"\n{count} runs: ran in {ran:.1f} s, deleted in {deleted:.1f} s; stored {full}")
    assert await stored(client) == baseline


async def _index_closed(conn: Connection, run_id: str, closed_ago: float = 0.0) -> None:
    """A closed run's summary in the run index, as the engine writes it (no history)."""
    closed = utcnow() - timedelta(seconds=closed_ago)
    info = RunInfo(
        run_id=run_id,
        workflow="w",
        queue="q",
        status="completed",
        created_at=closed,
        updated_at=closed,
        closed_at=closed,
    )
    await conn.publish(runs_subject(run_id), msgspec.json.encode(IndexEntry(hseq=1, info=info)))


async def _sweeps_over(
    client: Client, prefix: str, count: int, retention: float = 3600.0
) -> tuple[Connection, RetentionService]:
    """Sweeps of an index holding ``count`` runs closed just now, ``<prefix>-<n>``."""
    conn = client.connection
    await ensure_streams(conn)
    for i in range(count):
        await _index_closed(conn, f"{prefix}-{i}")
    return conn, RetentionService(conn, retention=retention)


async def _indexed(conn: Connection, run_id: str) -> bool:
    return await RunIndex(conn).get(run_id) is not None


async def test_a_sweep_reads_what_was_written_since_the_last_one_not_the_whole_index(
    client: Client,
) -> None:
    conn, sweeps = await _sweeps_over(client, "recent", 5)
    assert await sweeps.sweep() == 0
    assert sweeps.read == 5
    # Nothing new, and nothing stored before the hour that the oldest retention takes.
    assert await sweeps.sweep() == 0
    assert sweeps.read == 5
    for i in range(3):
        await _index_closed(conn, f"later-{i}")
    await _index_closed(conn, "closed-long-ago", closed_ago=7200.0)  # written late: due now
    assert await sweeps.sweep() == 1
    assert sweeps.read == 9
    assert not await _indexed(conn, "closed-long-ago")
    assert await _indexed(conn, "later-0")


async def test_a_summary_read_before_it_was_due_is_deleted_once_it_is(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    sweeps = RetentionService(conn, retention=1.0)
    await _index_closed(conn, "soon")
    assert await sweeps.sweep() == 0  # read and learned, not yet due
    await _index_closed(conn, "later")  # read by the next sweep, before it is due too
    for run_id in ("soon", "later"):

        async def swept(run_id: str = run_id) -> bool:
            await sweeps.sweep()
            return not await _indexed(conn, run_id)

        await wait_for(swept, timeout=10, what=f"run {run_id} deleted once due")


async def _recreate_index(conn: Connection) -> None:
    await conn.admin("deleting the run index", lambda: conn.jsm.delete_stream(RUNS_STREAM))
    conn.streams_ready = False  # as a process that starts after the delete
    await ensure_streams(conn)


@pytest.mark.parametrize("larger", [False, True], ids=["smaller", "larger"])
@pytest.mark.anyio  # set here: conftest's mark comes after parametrizing
async def test_an_index_deleted_and_rebuilt_is_read_again_from_its_start(
    client: Client, larger: bool
) -> None:
    conn, sweeps = await _sweeps_over(client, "before", 4)
    await sweeps.sweep()
    if larger:  # the index's start had moved on: only its first sequence tells of the rebuild
        await purge(conn, RUNS_STREAM, runs_subject("before-0"))
        await sweeps.sweep()
    await _recreate_index(conn)
    await _index_closed(conn, "rebuilt-due", closed_ago=7200.0)  # at sequence 1 again
    for i in range(6 if larger else 0):
        await _index_closed(conn, f"rebuilt-{i}")  # past where the last sweep read to
    assert await sweeps.sweep() == 1
    assert not await _indexed(conn, "rebuilt-due")


async def test_a_workflows_own_retention_applies_within_seconds_of_its_first_run(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """An engine with no retention of its own sweeps every 5 minutes, and not at once as it
    starts; a run that carries a shorter retention makes it sweep by that one."""
    async with (
        engine_with(nats_server.url, retention=None) as engine,
        running_worker(client, [brief]),
    ):
        await client.start(brief, run_id="brief-1")
        assert await client.handle("brief-1").result(timeout=20) == "brief"
        # By name, without the definition: the retention its workers declared (it was
        # ignored: such a run was kept by the engine's own, here for good).
        await client.start("brief", run_id="brief-2")
        assert await client.handle("brief-2").result(timeout=20) == "brief"

        async def deleted() -> bool:
            for run_id in ("brief-1", "brief-2"):
                try:
                    await client.describe(run_id)
                    return False
                except RunNotFound:
                    continue
            return True

        await wait_for(deleted, timeout=15, what="the runs deleted by their own retention")
        assert engine.retention.deleted == 2


async def test_a_sweep_leaves_a_run_started_under_the_id_of_one_it_listed_as_expired(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """Two engines sweep the same index: one deleted the run, its id was reused (an
    idempotency key), and the other's list, read before, still held the old summary: it
    purged by id and the new open run vanished (its summary stayed, pending for good)."""
    async with (
        engine_with(nats_server.url, retention=None) as engine,
        running_worker(client, [chatty]),
    ):
        assert await (await client.start(chatty, 1, run_id="reused")).result(timeout=20) == 1
        await wait_for(lambda: dispatcher_caught_up(client), what="the end folded")
        sweeper = RetentionService(client.connection, retention=0.001)
        listed = await sweeper._expired()
        assert [e.info.run_id for e in listed] == ["reused"]
        await client.delete("reused")  # the other replica's sweep, in between
        await client.start(chatty, -1, run_id="reused")  # waits for a signal: open
        await wait_for(lambda: _waiting(client, "reused"), what="the new run waiting")

        async def stale() -> list[IndexEntry]:
            return listed

        sweeper._expired = stale  # type: ignore[method-assign]
        assert await sweeper.sweep() == 0
        assert (await client.describe("reused")).status == "waiting"
        await client.cancel("reused")
    assert engine is not None


async def _waiting(client: Client, run_id: str) -> bool:
    try:
        return (await client.describe(run_id)).status == "waiting"
    except RunNotFound:
        return False


async def test_a_run_deleted_as_it_closes_is_not_written_back_by_the_engine(
    client: Client, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine was still folding the run's end when the delete purged it: its summary
    came back, "running" for good, and its lifecycle events kept its result."""
    from natflow_engine import _index

    folding, release, deleted = anyio.Event(), anyio.Event(), anyio.Event()
    apply = _index.RunIndex.apply

    async def slow_apply(self: RunIndex, run_id: str, event: object, *args: object) -> object:
        if run_id == "closing" and type(event).__name__ == "RunCompleted":
            folding.set()
            await release.wait()
        return await apply(self, run_id, event, *args)  # type: ignore[arg-type]

    async def delete() -> None:
        await client.delete("closing")
        deleted.set()

    monkeypatch.setattr(_index.RunIndex, "apply", slow_apply)
    async with engine_with(nats_server.url, retention=None), running_worker(client, [chatty]):
        assert await (await client.start(chatty, 2, run_id="closing")).result(timeout=20) == 2
        await folding.wait()  # the engine holds the run's end, half folded
        async with anyio.create_task_group() as tg:
            tg.start_soon(delete)
            with anyio.move_on_after(1):
                await deleted.wait()
            assert not deleted.is_set()  # it waits for the fold (it purged at once)
            release.set()
        await wait_for(lambda: dispatcher_caught_up(client), what="the engine caught up")
        assert "closing" not in {r.run_id for r in await client.list()}
        lifecycle = await client.connection.jsm.stream_info(
            "NATFLOW_LIFECYCLE", subjects_filter=">"
        )
        assert not [s for s in (lifecycle.state.subjects or {}) if s.endswith(".closing")]


async def test_retention_counts_from_when_the_server_stored_the_end_not_the_workers_clock(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """``closed_at`` is the clock of the worker that closed the run: one an hour behind had
    a run kept for 10 minutes deleted within a minute."""
    async with (
        engine_with(nats_server.url, retention=None),
        running_worker(client, [chatty]),
    ):
        assert await (await client.start(chatty, 3, run_id="skewed")).result(timeout=20) == 3
        await wait_for(lambda: dispatcher_caught_up(client), what="the end folded")
    conn = client.connection
    entry = await RunIndex(conn).get("skewed")
    assert entry is not None
    last = await HistoryStore(conn).last_stored("skewed")
    assert last is not None
    hour_ago = utcnow() - timedelta(hours=1)
    behind = msgspec.structs.replace(entry, closed_at=hour_ago, updated_at=hour_ago)
    indexed = IndexEntry(hseq=last[0], info=behind)
    await conn.publish(runs_subject("skewed"), msgspec.json.encode(indexed))  # as it wrote it
    sweeper = RetentionService(conn, retention=600.0)
    assert await sweeper.sweep() == 0
    assert (await client.describe("skewed")).status == "completed"
