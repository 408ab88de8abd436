"""History appends of many runs at once go out as atomic batches (``_append_batch``): each
append keeps its own expectation and lands where its caller is told; a batch refused for one
run's sake leaves the others to land alone; cancelled callers never stall the queue."""

from __future__ import annotations

import asyncio

import anyio
import msgspec
import pytest
from natflow import Client
from natflow_engine import HISTORY_STREAM, AppendConflict
from natflow_engine._append_batch import appender
from natflow_engine._history import HistoryStore
from natflow_engine._reader import reader
from natflow_engine._streams import ensure_streams, run_level_subject, stream_configs
from natflow_engine.events import RunClaimed, RunStarted, decode_event, utcnow


def _start(run_id: str) -> RunStarted:
    return RunStarted(
        id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )


def _claim(run_id: str) -> RunClaimed:
    return RunClaimed(id=f"{run_id}:2", at=utcnow(), worker="w", delivery=1)


async def test_appends_of_many_runs_at_once_land_in_batches_where_each_caller_is_told(
    client: Client,
) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    batcher = appender(client.connection, HISTORY_STREAM)
    runs = [f"batch-{n}" for n in range(60)]
    starts = await asyncio.gather(*(store.append(r, _start(r), 0) for r in runs))
    claims = await asyncio.gather(
        *(store.append(r, _claim(r), seq) for r, seq in zip(runs, starts, strict=True))
    )
    assert batcher.batches >= 2 and batcher.batched >= 50  # most went out grouped
    get = reader(client.connection)
    for run_id, seq, kind in [
        *((r, s, "run_started") for r, s in zip(runs, starts, strict=True)),
        *((r, s, "run_claimed") for r, s in zip(runs, claims, strict=True)),
    ]:
        msg = await get.get(HISTORY_STREAM, seq)
        assert msg is not None and (msg.headers or {})["Nats-Subject"] == run_level_subject(run_id)
        event = decode_event(msg.data)
        assert event.__struct_config__.tag == kind and event.id.startswith(f"{run_id}:")
    for run_id, seq in zip(runs, claims, strict=True):
        history = await store.read(run_id)
        assert [type(e) for e in history.events] == [RunStarted, RunClaimed]
        assert history.last_seq == seq


async def test_a_batch_refused_for_one_run_lands_the_others_alone(client: Client) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    batcher = appender(client.connection, HISTORY_STREAM)
    runs = [f"refused-{n}" for n in range(8)]
    starts = await asyncio.gather(*(store.append(r, _start(r), 0) for r in runs))
    expected = list(starts)
    expected[5] -= 1  # this writer read an older history: it must not append
    results = await asyncio.gather(
        *(store.append(r, _claim(r), e) for r, e in zip(runs, expected, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(results[5], AppendConflict)
    assert all(isinstance(r, int) for n, r in enumerate(results) if n != 5)
    for n, run_id in enumerate(runs):
        kinds = [type(e) for e in (await store.read(run_id)).events]
        assert kinds == ([RunStarted] if n == 5 else [RunStarted, RunClaimed])
    assert batcher.enabled


async def test_a_stream_without_atomic_batches_takes_the_appends_one_by_one(
    client: Client,
) -> None:
    config = next(c for c in stream_configs() if c.name == HISTORY_STREAM)
    config.allow_atomic = False  # as an older natflow created it
    await client.connection.jsm.add_stream(config)
    store = HistoryStore(client.connection)
    batcher = appender(client.connection, HISTORY_STREAM)
    runs = [f"plain-{n}" for n in range(10)]
    starts = await asyncio.gather(*(store.append(r, _start(r), 0) for r in runs))
    assert not batcher.enabled and batcher.batches == 0
    for run_id, seq in zip(runs, starts, strict=True):
        assert (await store.read(run_id)).last_seq == seq


async def test_a_caller_cancelled_after_being_handed_the_queue_passes_it_on(
    client: Client,
) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    batcher = appender(client.connection, HISTORY_STREAM)
    batcher._busy = True  # as if an append were in flight
    first = asyncio.ensure_future(store.append("turn-1", _start("turn-1"), 0))
    second = asyncio.ensure_future(store.append("turn-2", _start("turn-2"), 0))
    await anyio.wait_all_tasks_blocked()
    batcher._next()  # the in-flight append is done: the queue goes to the first caller
    first.cancel()  # ... which is cancelled before it could send it
    with anyio.fail_after(10):
        seq = await second
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await store.read("turn-2")).last_seq == seq
    assert not batcher._busy and not batcher._queue
