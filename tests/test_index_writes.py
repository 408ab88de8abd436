"""The run index writes a new run's summary without reading first; the write is conditional,
so a start folded twice (a redelivery, a restarted engine, another replica) counts once."""

from __future__ import annotations

import msgspec
import pytest
from natflow import Client
from natflow_engine import _completion
from natflow_engine._completion import RunHooks
from natflow_engine._connection import Connection
from natflow_engine._history import HistoryStore
from natflow_engine._index import IndexEntry, RunIndex
from natflow_engine._streams import ensure_streams, runs_subject
from natflow_engine.events import (
    RunClaimed,
    RunCompleted,
    RunStarted,
    StepCompleted,
    TimerScheduled,
    utcnow,
)
from prometheus_client import REGISTRY


async def test_a_start_folded_twice_is_indexed_once(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    start = RunStarted(
        id="twice-1:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    changes: list[tuple[str | None, str]] = []

    async def on_status(previous: str | None, info: object, hseq: int) -> None:
        changes.append((previous, getattr(info, "status", "?")))

    first = await RunIndex(conn).apply("twice-1", start, 5, on_status)
    assert first is not None and first.status == "pending"
    # A fresh index (nothing cached), as a restarted engine or another replica holds.
    assert await RunIndex(conn).apply("twice-1", start, 5, on_status) is None
    claim = RunClaimed(id="twice-1:2", at=utcnow(), worker="w1", delivery=1)
    index = RunIndex(conn)
    running = await index.apply("twice-1", claim, 6, on_status)
    assert running is not None and running.status == "running"
    assert (await index.get("twice-1")) == running
    # A start seen again after the claim (redelivered late) changes nothing.
    assert await RunIndex(conn).apply("twice-1", start, 5, on_status) is None
    assert (await RunIndex(conn).get("twice-1")) == running
    # The status hook may run again for a start folded twice (its effects are idempotent:
    # a lifecycle event's message id is its history event's), never with another status.
    assert changes[0] == (None, "pending") and ("pending", "running") in changes
    assert set(changes) == {(None, "pending"), ("pending", "running")}


async def test_an_event_folded_before_its_runs_start_is_placed_from_history(
    client: Client,
) -> None:
    """An engine that dies holding a run's start hands it back only after its ack deadline;
    the run's later events reach the restarted engine (or another replica) first. Each is
    folded on the run's history up to it, not dropped (dropped, the run's summary would
    stay 'pending' for good once the start came back, and its close would never be told)."""
    conn = client.connection
    await ensure_streams(conn)
    history = HistoryStore(conn)
    run = "late-start-1"
    start = RunStarted(
        id=f"{run}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    seq = await history.append(run, start, 0)
    seq = await history.append(run, RunClaimed(id=f"{run}:2", at=utcnow(), worker="w1"), seq)
    nap = TimerScheduled(id=f"{run}:3", at=utcnow(), seq=1, name="nap", due_at=utcnow())
    seq = await history.append(run, nap, seq)
    step = StepCompleted(
        id=f"{run}:4", at=utcnow(), seq=2, name="s", occurrence=1, started_at=utcnow()
    )
    seq = await history.append(run, step, seq)
    claimed_again = RunClaimed(id=f"{run}:5", at=utcnow(), worker="w2", delivery=2)
    claim_seq = seq = await history.append(run, claimed_again, seq)
    end = RunCompleted(id=f"{run}:6", at=utcnow(), result=msgspec.Raw(b'"done"'))
    end_seq = await history.append(run, end, seq)
    changes: list[tuple[str | None, str]] = []

    async def on_status(previous: str | None, info: object, hseq: int) -> None:
        changes.append((previous, getattr(info, "status", "?")))

    started = REGISTRY.get_sample_value("natflow_runs_started_total", {"workflow": "w"}) or 0
    index = RunIndex(conn)
    running = await index.apply(run, claimed_again, claim_seq, on_status)
    assert running is not None and running.status == "running" and running.worker == "w2"
    assert index.has_no_timers(run) is False  # the nap before the claim made a timer
    done = await index.apply(run, end, end_seq, on_status)
    assert done is not None and done.status == "completed"
    assert changes == [(None, "running"), ("running", "completed")]
    # The start, handed back at last, changes nothing: the run was counted as started once,
    # when its summary was placed (counted with the start alone, it never was).
    assert await RunIndex(conn).apply(run, start, 1, on_status) is None
    counted = REGISTRY.get_sample_value("natflow_runs_started_total", {"workflow": "w"})
    assert counted == started + 1
    summary = await RunIndex(conn).get(run)
    assert summary is not None and summary.status == "completed"
    assert summary.created_at == start.at


async def test_a_summary_rewritten_during_a_list_scan_is_listed_once(client: Client) -> None:
    """The index holds one message per run: a summary rewritten while ``list`` scans leaves
    its place for the stream's end, past where the scan began. It is listed, once, as
    rewritten (before, it went missing from that listing)."""
    conn = client.connection
    await ensure_streams(conn)
    index = RunIndex(conn)
    for n in range(3):
        start = RunStarted(
            id=f"scan-{n}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
        )
        assert await index.apply(f"scan-{n}", start, 10 + n) is not None
    claim = RunClaimed(id="scan-0:2", at=utcnow(), worker="w1")
    original = index._page
    rewritten = False

    async def racing_page(start: int, count: int, *, bounded: bool = True) -> object:
        nonlocal rewritten
        if not rewritten:  # the engine folds scan-0's claim just as the scan reads its page
            rewritten = True
            assert await RunIndex(conn).apply("scan-0", claim, 20) is not None
        return await original(start, count, bounded=bounded)

    index._page = racing_page  # type: ignore[method-assign]
    runs = await index.scan(limit=10)
    assert sorted((r.run_id, r.status) for r in runs) == [
        ("scan-0", "running"),
        ("scan-1", "pending"),
        ("scan-2", "pending"),
    ]


async def test_a_replica_that_did_not_fold_a_start_reads_it_at_the_end_only_for_a_hook(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's end folded by a replica that did not fold its start: the index says whether
    the start names an ``on_complete`` workflow, so the start is read only then (a read by
    subject: it walks every message stored since the run's start)."""
    conn = client.connection
    await ensure_streams(conn)
    reads: list[str] = []
    real_run_start = _completion.run_start

    async def run_start(conn: Connection, run_id: str) -> RunStarted | None:
        reads.append(run_id)
        return await real_run_start(conn, run_id)

    monkeypatch.setattr(_completion, "run_start", run_start)
    store = HistoryStore(conn)
    hooks = {"plain": None, "hooked": "follow_up"}
    for run_id, target in hooks.items():
        start = RunStarted(
            id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q", on_complete=target
        )
        seq = await store.append(run_id, start, 0)
        await RunIndex(conn).apply(run_id, start, seq)  # one replica folds the start
        end = RunCompleted(id=f"{run_id}:2", at=utcnow(), result=msgspec.Raw(b"1"))
        end_seq = await store.append(run_id, end, seq)
        other = RunIndex(conn)  # another replica folds the end
        await other.apply(run_id, end, end_seq)
        assert other.may_have_on_complete(run_id) is (target is not None)
        hooked = other.may_have_on_complete(run_id)
        await RunHooks(conn).event_folded(run_id, end, hooked=hooked)
    assert reads == ["hooked"]
    # A summary written before the index said so: not known, so the start is read.
    legacy = RunIndex(conn)
    info = await legacy.get("plain")
    assert info is not None
    await conn.publish(runs_subject("old"), msgspec.json.encode(IndexEntry(hseq=1, info=info)))
    assert await legacy.get("old") is not None
    assert legacy.may_have_on_complete("old")


async def test_a_write_that_meets_another_replicas_calls_the_status_hook_once(
    client: Client,
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    now = utcnow()
    start = RunStarted(id="race:1", at=now, workflow="w", queue="q")
    claim = RunClaimed(id="race:2", at=now, worker="w1", delivery=1)
    end = RunCompleted(id="race:3", at=now, result=msgspec.Raw(b"1"))
    first, second = RunIndex(conn), RunIndex(conn)
    await first.apply("race", start, 1)
    await second.apply("race", claim, 2)  # the first replica's cached summary is now stale
    told: list[tuple[str | None, str, int]] = []

    async def on_status(previous: str | None, info: object, hseq: int) -> None:
        told.append((previous, getattr(info, "status", "?"), hseq))

    done = await first.apply("race", end, 3, on_status)  # meets the claim, reads, again
    assert done is not None and done.status == "completed"
    assert told == [("pending", "completed", 3)]  # not again as ("running", "completed", 3)
    info = await RunIndex(conn).get("race")
    assert info is not None and info.status == "completed" and info.worker == "w1"
