"""A run's history is read as its two subjects by literal name (``_level_read``), which the
server's subject index answers, and placed by the events' positions; where the two reads
cannot be one history (an append between them, ids that are not positions) the one
wildcard read is made instead, and the history is the same either way."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine import HISTORY_STREAM, _reader
from natflow_engine._history import HistoryStore, current_stretch
from natflow_engine._level_read import in_position_order, read_by_level
from natflow_engine._streams import ensure_streams, history_subject
from natflow_engine.events import (
    Event,
    RunClaimed,
    RunCompleted,
    RunContinued,
    RunRestarted,
    RunStarted,
    StepCompleted,
    decode_event,
    unpacked,
    utcnow,
)

from tests.helpers import read_requests, running_worker


def _start(run_id: str) -> RunStarted:
    return RunStarted(
        id=f"{run_id}:1", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"null")
    )


def _step(event_id: str, n: int) -> StepCompleted:
    return StepCompleted(
        id=event_id,
        at=utcnow(),
        seq=n,
        name="s",
        occurrence=n,
        started_at=utcnow(),
        result=msgspec.Raw(str(n).encode()),
    )


def _claim(event_id: str) -> RunClaimed:
    return RunClaimed(id=event_id, at=utcnow(), worker="w", delivery=1)


async def _by_wildcard(client: Client, run_id: str) -> list[Event]:
    """What the one read of ``natflow.history.<run_id>.*`` makes of the run."""
    page = await _reader.reader(client.connection).read_all(HISTORY_STREAM, history_subject(run_id))
    return current_stretch(unpacked([decode_event(m.data) for m in page.messages]))


async def test_a_history_is_read_by_its_literal_subjects(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    run_id = "lvl-1"
    seq = await store.append(run_id, _start(run_id), 0)
    seq = await store.append(run_id, _claim(f"{run_id}:2"), seq)
    for n in (1, 2):
        seq = await store.append(run_id, _step(f"{run_id}:{n + 2}", n), seq)
    # the last step's outcome carried by the run's end (one message, two positions)
    end = RunCompleted(
        id=f"{run_id}:6", at=utcnow(), result=msgspec.Raw(b"3"), last_step=_step(f"{run_id}:5", 3)
    )
    last = await store.append(run_id, end, seq)
    sent = read_requests(monkeypatch)
    history = await store.read(run_id)
    # The start's own subject is looked up beside them: a run that starts now has it there.
    assert [r.get("next_by_subj") or r.get("multi_last") for r in sent] == [
        [f"natflow.history.{run_id}.start.>"],
        f"natflow.history.{run_id}.run",
        f"natflow.history.{run_id}.step",
    ]
    assert [e.id for e in history.events] == [f"{run_id}:{n}" for n in range(1, 7)]
    assert history.last_seq == last
    assert history.events == await _by_wildcard(client, run_id)


async def test_a_continued_run_is_read_from_its_newest_continuation(client: Client) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    run_id = "lvl-2"
    seq = await store.append(run_id, _start(run_id), 0)
    seq = await store.append(run_id, _step(f"{run_id}:2", 1), seq)
    cont = RunContinued(
        id=f"{run_id}:3",
        at=utcnow(),
        workflow="w",
        queue="q",
        input=msgspec.Raw(b"2"),
        events_before=2,
    )
    # the rollup drops the older run-level events; the older step stays until purged
    seq = await store.append(run_id, cont, seq, rollup=True)
    seq = await store.append(run_id, _step(f"{run_id}:4", 2), seq)
    history = await store.read(run_id)
    assert [e.id for e in history.events] == [f"{run_id}:3", f"{run_id}:4"]
    assert history.last_seq == seq
    assert history.events == await _by_wildcard(client, run_id)


async def test_reads_caught_between_appends_fall_back_to_one_read(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run-level read misses a claim appended right after it, the step-level read sees
    the step appended after that claim: the positions have a gap, so the two are not the
    history at any moment, and the wildcard read is made instead."""
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    run_id = "lvl-3"
    seq = await store.append(run_id, _start(run_id), 0)
    seq = await store.append(run_id, _step(f"{run_id}:2", 1), seq)
    read_all = _reader.BatchReader.read_all
    appended: list[int] = []
    ready = anyio.Event()

    async def between(self: Any, stream: str, subject: str | None = None, **kw: Any) -> Any:
        if subject == f"natflow.history.{run_id}.step" and not ready.is_set():
            await ready.wait()  # after the run-level read and the appends
        page = await read_all(self, stream, subject, **kw)
        if subject == f"natflow.history.{run_id}.run" and not ready.is_set():
            claimed = await store.append(run_id, _claim(f"{run_id}:3"), seq)
            appended.append(await store.append(run_id, _step(f"{run_id}:4", 2), claimed))
            ready.set()
        return page

    monkeypatch.setattr(_reader.BatchReader, "read_all", between)
    history = await store.read(run_id)
    assert [e.id for e in history.events] == [f"{run_id}:{n}" for n in range(1, 5)]
    assert history.last_seq == appended[0]


async def test_ids_that_are_not_positions_are_read_in_stream_order(client: Client) -> None:
    await ensure_streams(client.connection)
    store = HistoryStore(client.connection)
    run_id = "lvl-4"
    seq = await store.append(run_id, _start(run_id), 0)
    seq = await store.append(run_id, _step("written-elsewhere", 1), seq)
    seq = await store.append(run_id, _claim(f"{run_id}:3"), seq)
    history = await store.read(run_id)
    assert [e.id for e in history.events] == [f"{run_id}:1", "written-elsewhere", f"{run_id}:3"]
    assert history.last_seq == seq


def test_positions_place_two_reads_only_without_a_gap_or_repeat() -> None:
    run = [_start("r"), _claim("r:2")]
    steps = [_step("r:3", 1), _step("r:4", 2)]
    placed = in_position_order("r", run, steps)
    assert placed is not None and [e.id for e in placed] == ["r:1", "r:2", "r:3", "r:4"]
    assert in_position_order("r", run, [_step("r:4", 2)]) is None  # position 3 missing
    assert in_position_order("r", run, [_step("r:2", 1)]) is None  # position 2 twice
    assert in_position_order("r", [_claim("r:2")], steps) is None  # no position 1
    assert in_position_order("r", run, [_step("q:3", 1)]) is None  # another run's id
    assert in_position_order("r", run, [_step("r:x", 1)]) is None  # not a position
    assert in_position_order("r", [], []) == []
    # older stretches' leftovers come before the newest continuation and are dropped
    cont = RunContinued(
        id="r:5", at=utcnow(), workflow="w", queue="q", input=msgspec.Raw(b"1"), events_before=4
    )
    placed = in_position_order("r", [cont], [_step("r:2", 1), _step("r:6", 2)])
    assert placed is not None and [e.id for e in placed] == ["r:5", "r:6"]
    assert in_position_order("r", [cont], [_step("r:7", 2)]) is None  # 6 missing


async def _tick(n: int) -> int:
    return n + 1


@workflow(name="level_read_looper")
async def looper(ctx: WorkflowContext, stretch: int) -> int:
    n = await ctx.step("tick", _tick, stretch)
    if stretch == 1:
        ctx.continue_as_new(2)
    return await ctx.step("last", _tick, n)


def _ids_are_positions(run_id: str, events: list[Event]) -> bool:
    first = events[0]
    before = first.events_before if isinstance(first, RunContinued) else 0
    return [e.id for e in events] == [
        f"{run_id}:{n}" for n in range(before + 1, before + 1 + len(events))
    ]


async def test_a_restarted_continued_run_keeps_ids_that_are_positions(client: Client) -> None:
    """A restart of a continued run starts at position 1, and the original's
    ``run_restarted`` goes on from its stretch's positions: both read by level."""
    async with running_worker(client, [looper]):
        handle = await client.start(looper, 1, run_id="lvl-5")
        assert await handle.result(timeout=10) == 4
        again = await client.restart("lvl-5", from_step="last")
        assert await again.result(timeout=10) == 4
    store = HistoryStore(client.connection)
    for run_id in ("lvl-5", again.run_id):
        history = await store.read(run_id)
        assert type(history.events[0]) is RunContinued
        assert _ids_are_positions(run_id, history.events), [e.id for e in history.events]
        placed = await read_by_level(_reader.reader(client.connection), run_id)
        assert placed is not None and placed[0] == history.events  # no wildcard read needed
    original = (await store.read("lvl-5")).events
    assert type(original[-1]) is RunRestarted
