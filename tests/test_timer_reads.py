"""The engine drops a run's timers when the run ends, and reads the timers bucket for that only
when the run may have one: the run index remembers whether history ever showed the run a timer
(a delayed start, a sleep, a wait with a timeout, a retry's wait, a continuation)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import msgspec
from natflow import Client, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._index import IndexEntry, RunIndex
from natflow_engine._kv import kv_get
from natflow_engine._streams import ensure_streams, runs_subject
from natflow_engine._timers import TIMERS_BUCKET, Timer, schedule, timer_key
from natflow_engine.events import (
    RunClaimed,
    RunCompleted,
    RunStarted,
    SignalWaited,
    TimerScheduled,
    utcnow,
)
from nats.aio.msg import Msg

from tests.helpers import dispatcher_caught_up, running_worker, wait_for
from tests.workflows_waits import of, wait_once

TIMER_READS = f"$JS.API.DIRECT.GET.KV_{TIMERS_BUCKET}"  # the batch read of a run's timers


def _same(value: int) -> int:
    return value


@workflow(name="no-timers")
async def no_timers(ctx: WorkflowContext, n: int) -> int:
    a = await ctx.step("one", _same, n)
    return await ctx.step("two", _same, a + 1)


@asynccontextmanager
async def counting(client: Client, *subjects: str) -> AsyncIterator[list[str]]:
    """Every request on ``subjects`` made while inside, by anyone (seen on the server)."""
    seen: list[str] = []

    async def note(msg: Msg) -> None:
        seen.append(msg.subject)

    nc = client.connection.nc
    subs = [await nc.subscribe(subject, cb=note) for subject in subjects]
    await nc.flush()
    try:
        yield seen
    finally:
        for sub in subs:
            await sub.unsubscribe()


async def test_runs_that_never_had_a_timer_end_without_a_look_at_the_timers(
    client: Client, engine: Engine
) -> None:
    async with (
        counting(client, TIMER_READS, TIMER_READS + ".>") as reads,
        running_worker(client, [no_timers]),
    ):
        handles = [await client.start(no_timers, i, run_id=f"untimed-{i}") for i in range(3)]
        for handle in handles:
            await handle.result(timeout=20)
        await wait_for(
            lambda: dispatcher_caught_up(client), what="the dispatcher to fold every end"
        )
        await client.connection.nc.flush()
    assert reads == []


async def test_a_run_with_a_timer_still_has_it_dropped_at_its_end(
    client: Client, engine: Engine
) -> None:
    async with counting(client, TIMER_READS) as reads, running_worker(client, [wait_once]):
        handle = await client.start(wait_once, 600.0, run_id="timed-1")

        async def waiting() -> SignalWaited | None:
            waited = of(await client.history("timed-1"), SignalWaited)
            key = timer_key("timed-1", waited[0].seq) if waited else ""
            found = waited and await kv_get(client.connection, TIMERS_BUCKET, key)
            return waited[0] if found else None

        waited = await wait_for(waiting, what="the wait's timeout timer in KV")
        assert waited is not None
        await client.signal("timed-1", "x", "here")
        assert await handle.result(timeout=20) == "here"
        key = timer_key("timed-1", waited.seq)

        async def gone() -> bool:
            return await kv_get(client.connection, TIMERS_BUCKET, key) is None

        await wait_for(gone, what="the timeout timer dropped as the run ended")
    assert reads  # its timers were looked up


async def test_a_timer_event_folded_after_its_runs_end_leaves_no_timer(client: Client) -> None:
    """Another replica (or a redelivery) folds the run's end before the sleep that preceded
    it: the end saw a run without timers, so the sleep's fold drops the run's timers."""
    conn = client.connection
    await ensure_streams(conn)
    engine = Engine(conn)
    run_id, now = "late-sleep", utcnow()
    start = RunStarted(id=f"{run_id}:1", at=now, workflow="w", queue="q")
    sleep = TimerScheduled(
        id=f"{run_id}:3", at=now, seq=1, name="nap", due_at=now + timedelta(hours=1)
    )
    end = RunCompleted(id=f"{run_id}:4", at=now)
    assert await engine._index.apply(run_id, start, 10) is not None
    assert await engine._index.apply(run_id, end, 40) is not None
    assert engine._index.has_no_timers(run_id)  # as far as the index knows
    # The worker wrote the sleep's timer itself as it let the run go.
    await schedule(conn, Timer(run_id=run_id, seq=1, name="nap", due_at=sleep.due_at))
    assert await engine._index.apply(run_id, sleep, 30) is None  # older than the end
    await engine._keep_timers(run_id, sleep, 30)

    async def dropped() -> bool:  # deleted without waiting for the acknowledgement
        return await kv_get(conn, TIMERS_BUCKET, timer_key(run_id, 1)) is None

    await wait_for(dropped, timeout=3, what="the sleep's timer dropped")


async def test_the_index_remembers_whether_a_run_had_a_timer(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    now = utcnow()
    start = RunStarted(id="r:1", at=now, workflow="w", queue="q")
    claim = RunClaimed(id="r:2", at=now, worker="w1", delivery=1)
    sleep = TimerScheduled(id="r:3", at=now, seq=1, name="nap", due_at=now)
    index = RunIndex(conn)
    await index.apply("r", start, 1)
    assert index.has_no_timers("r")
    fresh = RunIndex(conn)  # a restarted engine, or another replica
    await fresh.apply("r", claim, 2)
    assert fresh.has_no_timers("r")
    await fresh.apply("r", sleep, 3)
    assert not fresh.has_no_timers("r")
    again = RunIndex(conn)
    await again.apply("r", RunCompleted(id="r:4", at=now), 4)
    assert not again.has_no_timers("r")  # once a run had a timer, it is looked for at its end
    delayed = RunStarted(id="d:1", at=now, workflow="w", queue="q", not_before=now)
    await index.apply("d", delayed, 5)
    assert not index.has_no_timers("d")
    # A summary written before the index said so: not known, so looked for as always.
    info = await RunIndex(conn).get("r")
    assert info is not None
    old = msgspec.json.encode(IndexEntry(hseq=1, info=info))
    await conn.publish(runs_subject("old"), old, {})
    legacy = RunIndex(conn)
    await legacy.apply("old", RunCompleted(id="old:9", at=now), 9)
    assert not legacy.has_no_timers("old")
