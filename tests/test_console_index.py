"""The console's runs list over the run index (issue 15): pages newest first with a cursor,
filters, live counts that follow every summary the engine writes, and filtered pages from
the live index. Index entries are published straight into NATFLOW_RUNS, as the engine would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import pytest
from natflow_engine._connect import connect
from natflow_engine._connection import Connection
from natflow_engine._index import IndexEntry
from natflow_engine._server import EmbeddedServer
from natflow_engine._state import RunInfo
from natflow_engine._streams import ensure_streams, runs_subject
from natflow_engine.console._counts import StatusCounts
from natflow_engine.console._reads import RunFilter, list_runs, select_runs

from tests.console_helpers import http, served_console
from tests.helpers import wait_for

BASE = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _info(n: int, status: str) -> RunInfo:
    created = BASE + timedelta(minutes=n)
    return RunInfo(
        run_id=f"run-{n:03d}",
        workflow="order" if n % 2 else "refund",
        queue="payments" if n % 5 == 0 else "default",
        status=status,  # type: ignore[arg-type]
        created_at=created,
        updated_at=created,
    )


async def _put(conn: Connection, info: RunInfo, hseq: int) -> None:
    await conn.publish(
        runs_subject(info.run_id), msgspec.json.encode(IndexEntry(hseq=hseq, info=info))
    )


def _status(n: int) -> str:
    return "failed" if n % 10 == 0 else "completed"


@pytest.fixture
async def conn(nats_server: EmbeddedServer) -> AsyncIterator[Connection]:
    c = await connect(nats_server.url)
    await ensure_streams(c)
    for n in range(1, 131):
        await _put(c, _info(n, _status(n)), hseq=10)
    try:
        yield c
    finally:
        await c.close()


async def test_pages_newest_first_with_a_cursor(conn: Connection) -> None:
    seen: list[str] = []
    before = None
    sizes = []
    while True:
        page = await list_runs(conn, RunFilter(), before=before)
        sizes.append(len(page.runs))
        seen.extend(r.run_id for r in page.runs)
        if page.older is None:
            break
        before = page.older
    assert sizes == [50, 50, 30]
    assert seen == [f"run-{n:03d}" for n in range(130, 0, -1)]


async def test_filters_on_the_index_stream(conn: Connection) -> None:
    page = await list_runs(conn, RunFilter(status="failed", queue="payments"))
    assert [r.run_id for r in page.runs] == [f"run-{n:03d}" for n in range(130, 0, -10)]
    since = BASE + timedelta(minutes=121)
    page = await list_runs(conn, RunFilter(since=since))
    assert [r.run_id for r in page.runs] == [f"run-{n:03d}" for n in range(130, 120, -1)]


async def test_live_counts_follow_the_index_and_filter_pages(conn: Connection) -> None:
    counts = StatusCounts()
    async with anyio.create_task_group() as tg:
        tg.start_soon(counts.follow, conn)

        async def loaded() -> bool:
            return counts.loaded

        await wait_for(loaded, what="the index to load")
        assert counts.total == 130
        assert counts.by_status["failed"] == 13 and counts.by_status["completed"] == 117
        await _put(conn, _info(7, "running"), hseq=20)  # a newer summary of run 7
        counts.apply(IndexEntry(hseq=5, info=_info(8, "running")))  # older, late: ignored

        async def moved() -> bool:
            return counts.by_status["running"] == 1

        await wait_for(moved, what="the counts to follow the index")
        assert counts.by_status["completed"] == 116 and counts.total == 130
        where = RunFilter(workflow="refund", status="completed")
        first = await select_runs(conn, counts, where, 0)
        second = await select_runs(conn, counts, where, 50)
        assert first.matching == 52 and len(first.runs) == 50 and len(second.runs) == 2
        ids = [r.run_id for r in first.runs + second.runs]
        assert len(set(ids)) == 52 and ids[0] == "run-128"
        assert all(r.workflow == "refund" and r.status == "completed" for r in first.runs)
        tg.cancel_scope.cancel()


async def test_runs_page_filters_and_pages(nats_server: EmbeddedServer, conn: Connection) -> None:
    async with served_console(nats_server.url) as base:
        status, body, _ = await http(base + "/runs")
        assert status == 200 and body.count('class="run-row"') == 50
        assert "run-130" in body and "run-080" not in body

        async def filtered() -> bool:
            got = (await http(base + "/runs?status=failed"))[1]
            return "13 matching runs" in got

        await wait_for(filtered, what="a filtered page from the live index")
        status, body, _ = await http(base + "/runs?status=failed&workflow=refund")
        assert body.count('class="run-row"') == 13
        _, body, _ = await http(base + "/runs?before=81")
        assert "run-080" in body and "run-081" not in body
        status, _, headers = await http(base + "/runs?run_id=run-007")  # an exact id: go there
        assert status == 303 and headers["location"] == "/runs/run-007"
        status, body, _ = await http(base + "/runs?run_id=run-12")  # part of ids: the matches
        assert status == 200 and "10 matching runs" in body  # run-120 to run-129
        assert body.count('class="run-row"') == 10


async def test_live_counts_read_the_index_again_and_drop_deleted_runs(conn: Connection) -> None:
    counts = StatusCounts(refresh=0.5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(counts.follow, conn)

        async def loaded() -> bool:
            return counts.loaded and counts.total == 130

        await wait_for(loaded, what="the index to load")
        await conn.jsm.purge_stream("NATFLOW_RUNS", subject=runs_subject("run-010"))

        async def dropped() -> bool:
            return counts.total == 129

        await wait_for(dropped, what="a deleted run to drop out")
        assert counts.by_status["failed"] == 12
        tg.cancel_scope.cancel()


async def test_a_list_over_the_scan_limit_says_it_looked_at_the_newest_only(
    conn: Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the scan limit, a list's filters and count covered the newest summaries only,
    silently: a waiting run among the older ones was not found, and no one was told."""
    from natflow_engine import _index
    from natflow_engine._index import RunIndex

    monkeypatch.setattr(_index, "SCAN_LIMIT", 100)
    monkeypatch.setattr(_index, "_PAGE", 50)
    index = RunIndex(conn)
    _, total, looked = await index.page(status="failed", limit=5)
    assert looked is not None and looked >= 100 and total < 13  # 13 of the 130 failed
    assert await index.scan(limit=5)
    assert "more than 100 summaries" in caplog.text
    monkeypatch.setattr(_index, "SCAN_LIMIT", 200_000)
    _, total, looked = await index.page(status="failed", limit=5)
    assert (total, looked) == (13, None)


async def test_deleted_runs_leave_filtered_pages_and_counts_long_before_a_refresh(
    conn: Connection,
) -> None:
    """A delete purges a run's summary and publishes nothing: deleted runs stayed in the
    counts and in the "N matching runs" of filtered pages until the 10-minute refresh. A
    filtered page that finds a summary gone drops the run at once; a check of the index's
    size reads it again soon after a delete that no page touched."""
    counts = StatusCounts(check=3600)  # first: the filtered page alone, no size check
    async with anyio.create_task_group() as tg:
        tg.start_soon(counts.follow, conn)

        async def loaded() -> bool:
            return counts.loaded and counts.total == 130

        await wait_for(loaded, what="the index to load")
        for n in (10, 20):  # the index's part of client.delete (purge_run)
            await conn.jsm.purge_stream("NATFLOW_RUNS", subject=runs_subject(f"run-{n:03d}"))
        page = await select_runs(conn, counts, RunFilter(status="failed"), 0)
        assert page.matching == 11 and len(page.runs) == 11
        assert {"run-010", "run-020"}.isdisjoint(r.run_id for r in page.runs)
        assert counts.total == 128 and counts.by_status["failed"] == 11
        tg.cancel_scope.cancel()

    counts = StatusCounts(check=0.2)  # then: no page at all, the size check finds them
    async with anyio.create_task_group() as tg:
        tg.start_soon(counts.follow, conn)

        async def reloaded() -> bool:
            return counts.loaded and counts.total == 128

        await wait_for(reloaded, what="the index to load")
        await conn.jsm.purge_stream("NATFLOW_RUNS", subject=runs_subject("run-030"))

        async def dropped() -> bool:
            return counts.total == 127

        with anyio.fail_after(5):  # not the refresh (600 s)
            await wait_for(dropped, what="a deleted run to drop out")
        assert counts.by_status["failed"] == 10
        tg.cancel_scope.cancel()


async def test_runs_page_counts_forget_deleted_runs(
    nats_server: EmbeddedServer, conn: Connection
) -> None:
    """The hunter's scenario over HTTP: after a delete, the runs page's counts and a
    filtered page's total no longer count the deleted runs (they did for 10 minutes)."""
    async with served_console(nats_server.url) as base:

        async def counted() -> bool:
            return "<b>130</b> runs" in (await http(base + "/runs"))[1]

        await wait_for(counted, what="the counts")
        for n in range(10, 50, 10):
            await conn.jsm.purge_stream("NATFLOW_RUNS", subject=runs_subject(f"run-{n:03d}"))
        body = (await http(base + "/runs?status=failed"))[1]
        assert "9 matching runs" in body and "run-040" not in body

        async def forgotten() -> bool:
            body = (await http(base + "/runs"))[1]
            return "<b>126</b> runs" in body and 'data-status="failed"><b>9</b>' in body

        with anyio.fail_after(10):
            await wait_for(forgotten, what="the runs page to stop counting deleted runs")
