"""New runs taken by their workers straight from history (``_start_consumers``): a run that
starts while a worker serves its queue and workflow has its start stored where that worker
reads it, and no task is written, delivered or removed for it; the engine's start watch
leaves a start its consumer holds alone, and enqueues one whose consumer is gone; pausing a
queue holds its new runs too."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from natflow import Client, NatflowError, WorkflowContext, workflow
from natflow_engine import HISTORY_STREAM, TASK_PREFIX, _start_consumers, decode_task, queue_paused
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine._index import RunIndex
from natflow_engine._level_read import first_start
from natflow_engine._queues import pause_queue, resume_queue
from natflow_engine._server import EmbeddedServer
from natflow_engine._start_consumers import ensure_start_consumer, held_starts, starts_taken
from natflow_engine._start_watch import WatchedStart
from natflow_engine._streams import (
    ensure_streams,
    history_subject,
    run_level_subject,
    start_consumer,
    start_subject,
    start_subjects,
)
from natflow_engine.events import RunClaimed, RunStarted, decode_event, utcnow

from tests.helpers import overheard, running_worker, start_pulls, wait_for


async def _double(x: int) -> int:
    return 2 * x


@workflow(name="start_consumers_one_step")
async def one_step(ctx: WorkflowContext, x: int) -> int:
    return await ctx.step("double", _double, x)


async def _stored_subject(client: Client, run_id: str) -> str:
    body = msgspec.json.encode({"last_by_subj": start_subjects(run_id)})
    conn = client.connection
    msg = await conn.request(f"{conn.api}.DIRECT.GET.{HISTORY_STREAM}", body)
    return (msg.headers or {}).get("Nats-Subject", "")


async def test_a_run_started_while_its_workers_serve_it_gets_no_task(client: Client) -> None:
    history_reads = f"$JS.API.DIRECT.GET.{HISTORY_STREAM}"
    async with running_worker(client, [one_step]):
        await wait_for(lambda: start_pulls(client, "default", one_step.name), what="start pulls")
        async with (
            overheard(client, f"{TASK_PREFIX}.>") as tasks,
            overheard(client, history_reads) as reads,
        ):
            handle = await client.start(one_step, 21, run_id="sc-1")
            assert await handle.result(timeout=10) == 42
    assert tasks == []
    assert await _stored_subject(client, "sc-1") == start_subject("sc-1", "default", one_step.name)
    events = await client.history("sc-1")
    assert isinstance(events[0], RunStarted)
    # Claimed at its first delivery, with no second try, and with no read of its history:
    # what the start consumer delivered is the stored start itself (a task's start is a
    # hint, looked up by its sequence). The one read is the client's, for result().
    assert [e.delivery for e in events if isinstance(e, RunClaimed)] == [1]
    assert [msgspec.json.decode(m.data) for m in reads] == [
        {"last_by_subj": history_subject("sc-1")}
    ]


async def test_an_idle_worker_asks_for_new_runs_a_quarter_of_its_slots_at_a_time(
    client: Client,
) -> None:
    """Each run taken and each run ended does not make its own pull request: the worker
    asks again once a quarter of its slots is free and unasked for (20 runs one after
    another, 8 slots: a request for 2 every 2 runs at most, not one for each run)."""
    conn = client.connection
    pulls = (
        f"{conn.api}.CONSUMER.MSG.NEXT.{HISTORY_STREAM}.{start_consumer('default', one_step.name)}"
    )
    async with running_worker(client, [one_step], max_concurrent_runs=8):
        await wait_for(lambda: start_pulls(client, "default", one_step.name), what="start pulls")
        async with overheard(client, pulls) as requests:
            for i in range(20):
                handle = await client.start(one_step, i, run_id=f"sc-pull-{i}")
                assert await handle.result(timeout=10) == 2 * i
        asked = [msgspec.json.decode(m.data)["batch"] for m in requests]
    assert 1 <= len(asked) <= 10, asked
    assert all(batch >= 2 for batch in asked), asked


async def test_a_start_no_worker_takes_from_history_gets_its_task(client: Client) -> None:
    """No start consumer for the queue and workflow (no worker served it yet): the task is
    written, and a worker that comes later runs the run through it."""
    async with overheard(client, f"{TASK_PREFIX}.>") as tasks:
        handle = await client.start(one_step, 5, run_id="sc-2")

        async def sent() -> bool:
            return bool(tasks)

        await wait_for(sent, what="the task")
    # On the run-level subject: a start consumer created now (with the worker) must not
    # take it too (its task does).
    assert await _stored_subject(client, "sc-2") == ""
    first = await first_start(client.connection, "sc-2")
    assert first is not None and (first.headers or {})["Nats-Subject"] == run_level_subject("sc-2")
    async with running_worker(client, [one_step]):
        assert await handle.result(timeout=10) == 10


async def test_the_start_watch_leaves_a_start_its_consumer_holds(
    client: Client, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start still alone after its grace, held by its start consumer (no worker pulling
    yet), is the consumer's: the engine enqueues nothing. One stored before its consumer
    existed is not held, so the engine enqueues its task as for a client that died."""
    conn = client.connection
    await ensure_streams(conn)
    before = await client.start(one_step, 1, run_id="sc-early")  # no consumer: .run, a task
    await ensure_start_consumer(conn, "default", one_step.name)
    # This connection learned a moment ago that there was none (trusted for a few seconds):
    # another client, as a client that connects now, finds the consumer and writes no task.
    async with await Client.connect(nats_server.url) as later:
        assert await starts_taken(later.connection, "default", one_step.name)
        await later.start(one_step, 2, run_id="sc-held")
    engine = Engine(conn)
    watched = []
    for run_id in (before.run_id, "sc-held"):
        sub = await conn.js.pull_subscribe(
            history_subject(run_id), f"test-{run_id}", stream=HISTORY_STREAM
        )
        (msg,) = await sub.fetch(1, timeout=5)
        start = decode_event(msg.data)
        assert isinstance(start, RunStarted)
        watched.append(WatchedStart(run_id=run_id, start=start, msg=msg, due=0.0, due_stored=0.0))
    seqs = [w.msg.metadata.sequence.stream for w in watched]
    stored = [w.msg.metadata.timestamp.timestamp() for w in watched]
    starts = [("default", one_step.name, seq, at) for seq, at in zip(seqs, stored, strict=True)]
    # Stored within CREATED_MARGIN of the consumer's creation: not taken for held.
    assert await held_starts(conn, starts) == set()
    assert [w.run_id for w in await engine._without_task(watched)] == ["sc-held"]
    # A start stored after its consumer existed is held; one stored before never is.
    monkeypatch.setattr(_start_consumers, "CREATED_MARGIN", -1.0)
    assert await held_starts(conn, starts) == {seqs[1]}
    # sc-early has its task (written by its client), sc-held its consumer: nothing to do.
    assert await engine._without_task(watched) == []
    assert not await starts_taken(conn, "default", one_step.name)  # still trusted: no


async def test_a_paused_queue_holds_its_new_runs(client: Client) -> None:
    conn = client.connection
    async with running_worker(client, [one_step]):
        await wait_for(lambda: start_pulls(client, "default", one_step.name), what="start pulls")
        await pause_queue(conn, "default")
        try:
            info = await conn.jsm.consumer_info(
                HISTORY_STREAM, start_consumer("default", one_step.name)
            )
            assert info.paused and await queue_paused(conn, "default")
            handle = await client.start(one_step, 3, run_id="sc-paused")

            async def waiting() -> bool:
                info = await conn.jsm.consumer_info(
                    HISTORY_STREAM, start_consumer("default", one_step.name)
                )
                return info.num_pending == 1 and info.num_ack_pending == 0

            await wait_for(waiting, what="the start kept in its consumer")
            claims = [e for e in await client.history("sc-paused") if isinstance(e, RunClaimed)]
            assert claims == []
        finally:
            await resume_queue(conn, "default")
        assert await handle.result(timeout=10) == 6
    # A queue no worker serves (a typo) has nothing to resume: it says so, not "resumed".
    with pytest.raises(NatflowError, match="queue 'defualt' has no task consumer"):
        await resume_queue(conn, "defualt")


async def test_a_start_sent_to_a_consumer_deleted_since_is_enqueued_by_the_engine(
    client: Client, engine: Engine
) -> None:
    """The client trusts a start consumer it saw for a minute: one an operator deleted
    meanwhile takes no start, and the engine's start watch enqueues its task after the
    grace (the run is late, not lost)."""
    conn = client.connection
    await ensure_streams(conn)
    await ensure_start_consumer(conn, "default", one_step.name)
    assert await starts_taken(conn, "default", one_step.name)
    await conn.jsm.delete_consumer(HISTORY_STREAM, start_consumer("default", one_step.name))
    async with overheard(client, f"{TASK_PREFIX}.>") as tasks:
        handle = await client.start(one_step, 7, run_id="sc-orphan")
        assert await _stored_subject(client, "sc-orphan") == start_subject(
            "sc-orphan", "default", one_step.name
        )
        assert tasks == []  # its client wrote none
        async with running_worker(client, [one_step]):
            assert await handle.result(timeout=20) == 14
    assert [decode_task(m.data).reason for m in tasks] == ["dispatch"]  # the engine's


async def test_a_burst_of_starts_on_a_new_connection_looks_for_the_consumer_once(
    client: Client, nats_server: EmbeddedServer
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    await ensure_start_consumer(conn, "default", one_step.name)
    info_subject = f"{conn.api}.CONSUMER.INFO.{HISTORY_STREAM}.>"
    async with (
        await Client.connect(nats_server.url) as fresh,
        overheard(client, info_subject) as lookups,
        overheard(client, f"{TASK_PREFIX}.>") as tasks,
    ):
        await asyncio.gather(*(fresh.start(one_step, n, run_id=f"burst-{n}") for n in range(20)))
        await client.connection.nc.flush()
    assert len(lookups) == 1
    assert tasks == []


async def test_a_run_whose_start_is_on_its_own_subject_is_read_and_indexed_whole(
    client: Client,
) -> None:
    """Its history reads the start first; the index folds an event of a run it has no
    summary for (the start taken by an engine that died) from the start on its subject."""
    conn = client.connection
    await ensure_streams(conn)
    store = HistoryStore(conn)
    start = RunStarted(
        id="sc-own:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )
    seq = await store.append("sc-own", start, 0, subject=start_subject("sc-own", "q", "w"))
    claim = RunClaimed(id="sc-own:2", at=utcnow(), worker="w1", delivery=1)
    claimed = await store.append("sc-own", claim, seq)
    history = await store.read("sc-own")
    assert [e.id for e in history.events] == ["sc-own:1", "sc-own:2"]
    assert history.last_seq == claimed
    info = await RunIndex(conn).apply("sc-own", claim, claimed)
    assert info is not None and (info.workflow, info.status) == ("w", "running")
