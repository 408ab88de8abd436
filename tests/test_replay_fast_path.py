"""A sequential replay resolves each recorded step as it is asked for, without a loop turn per
step; wherever another task could run first, replay delivers in history order as always."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from natflow import StepError, WorkflowContext, workflow
from natflow._loop import WorkflowLoop
from natflow._replay import WorkflowState
from natflow_engine import ErrorInfo, History
from natflow_engine.events import (
    Event,
    RunClaimed,
    RunStarted,
    StepCompleted,
    StepFailed,
    utcnow,
)


def double(n: int) -> int:
    return 2 * n


@workflow(name="fast_chain")
async def fast_chain(ctx: WorkflowContext, n: int) -> list[int]:
    return [await ctx.step("s", double, i) for i in range(n)]


@workflow(name="fast_fan")
async def fast_fan(ctx: WorkflowContext, n: int) -> list[int]:
    async def branch(i: int) -> int:
        first = await ctx.step("a", double, i)
        return await ctx.step("b", double, first)

    return list(await asyncio.gather(*(branch(i) for i in range(n))))


def history(workflow_name: str, n: int, steps: list[tuple[int, str, int]]) -> History:
    """A run's history: its start, a claim, then ``(seq, name, result)`` step outcomes."""
    now = utcnow()
    events: list[Event] = [
        RunStarted(
            id="r:1", at=now, workflow=workflow_name, queue="q", input=msgspec.Raw(b"%d" % n)
        ),
        RunClaimed(id="r:2", at=now, worker="w"),
    ]
    occurrences: dict[str, int] = {}
    for seq, name, result in steps:
        occurrences[name] = occurrences.get(name, 0) + 1
        events.append(
            StepCompleted(
                id=f"r:{len(events) + 1}",
                at=now,
                seq=seq,
                name=name,
                occurrence=occurrences[name],
                started_at=now,
                result=msgspec.Raw(b"%d" % result),
            )
        )
    return History("r", events, len(events))


def test_a_sequential_replay_takes_no_loop_turn_per_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ticks = 0
    run_until_idle = WorkflowLoop.run_until_idle

    def counted(self: WorkflowLoop) -> None:
        nonlocal ticks
        ticks += 1
        run_until_idle(self)

    monkeypatch.setattr(WorkflowLoop, "run_until_idle", counted)
    n = 200
    state = WorkflowState(
        fast_chain, history("fast_chain", n, [(i + 1, "s", 2 * i) for i in range(n)])
    )
    state.begin()
    try:
        assert state.block is None
        assert state.root is not None and state.root.done()
        assert state.root.result() == [2 * i for i in range(n)]
        assert ticks <= 2  # was one per step
    finally:
        state.close()


def test_parallel_branches_replay_in_history_order() -> None:
    """The outcomes of 'a' come back in reverse order: the branch whose 'a' is recorded
    first issues its 'b' first (its position) on replay as it did live."""
    n = 3
    steps = [(3 - i, "a", 2 * (2 - i)) for i in range(n)]  # a of branch 2, 1, 0
    # The 'b' commands got positions 4, 5, 6 in the order the 'a' outcomes arrived.
    steps += [(4 + i, "b", 4 * (2 - i)) for i in range(n)]
    state = WorkflowState(fast_fan, history("fast_fan", n, steps))
    state.begin()
    try:
        assert state.block is None, state.block
        assert state.root is not None and state.root.done()
        assert state.root.result() == [0, 4, 8]
    finally:
        state.close()


class Point(msgspec.Struct):
    x: int


def point(x: int) -> Point:
    return Point(x)


@workflow(name="fast_points")
async def fast_points(ctx: WorkflowContext, n: int) -> list[Point]:
    return [await ctx.step("p", point, i) for i in range(n)]


def test_a_sequential_replay_keeps_no_command_per_step() -> None:
    """A long replay builds nothing per recorded step beyond its value (a 10,000-step run
    once kept 10,000 commands, with their arguments, for the run's life)."""
    n = 50
    state = WorkflowState(
        fast_chain, history("fast_chain", n, [(i + 1, "s", 2 * i) for i in range(n)])
    )
    state.begin()
    try:
        assert state.root is not None and state.root.result() == [2 * i for i in range(n)]
        assert [state.command(i + 1) for i in range(n)] == [None] * n
    finally:
        state.close()


def test_replayed_results_decode_as_annotated_or_as_plain_json() -> None:
    now = utcnow()
    events: list[Event] = [
        RunStarted(id="r:1", at=now, workflow="fast_points", queue="q", input=msgspec.Raw(b"2")),
        RunClaimed(id="r:2", at=now, worker="w"),
    ]
    # The first result fits the step's annotation; the second, recorded by older code,
    # no longer does and reads back as the JSON it is.
    for seq, raw in ((1, b'{"x":7}'), (2, b'{"y":1}')):
        events.append(
            StepCompleted(
                id=f"r:{seq + 2}",
                at=now,
                seq=seq,
                name="p",
                occurrence=seq,
                started_at=now,
                result=msgspec.Raw(raw),
            )
        )
    state = WorkflowState(fast_points, History("r", events, len(events)))
    state.begin()
    try:
        assert state.block is None, state.block
        assert state.root is not None and state.root.result() == [Point(7), {"y": 1}]
    finally:
        state.close()


def test_a_renamed_step_in_a_sequential_replay_is_a_divergence() -> None:
    n = 3
    steps = [(1, "s", 0), (2, "renamed", 2), (3, "s", 4)]
    state = WorkflowState(fast_chain, history("fast_chain", n, steps))
    state.begin()
    try:
        assert state.block is not None
        assert state.block.position == 2
        assert "renamed" in str(state.block)
    finally:
        state.close()


@workflow(name="fast_failing")
async def fast_failing(ctx: WorkflowContext, n: int) -> list[str]:
    seen = []
    for i in range(n):
        try:
            seen.append(str(await ctx.step("f", double, i)))
        except StepError as exc:
            seen.append(f"failed: {exc.error.message}")
    return seen


def test_a_failed_step_in_a_sequential_replay_raises_its_recorded_error() -> None:
    now = utcnow()
    events: list[Event] = [
        RunStarted(id="r:1", at=now, workflow="fast_failing", queue="q", input=msgspec.Raw(b"3")),
        RunClaimed(id="r:2", at=now, worker="w"),
    ]
    for seq in (1, 2, 3):
        common = {"id": f"r:{seq + 2}", "at": now, "seq": seq, "name": "f", "occurrence": seq}
        if seq == 2:
            error = ErrorInfo(type="ValueError", message="no")
            events.append(StepFailed(**common, started_at=now, error=error))
        else:
            events.append(StepCompleted(**common, started_at=now, result=msgspec.Raw(b"7")))
    state = WorkflowState(fast_failing, History("r", events, len(events)))
    state.begin()
    try:
        assert state.block is None, state.block
        assert state.root is not None and state.root.result() == ["7", "failed: no", "7"]
    finally:
        state.close()
