"""A sequential replay resolves each recorded step as it is asked for, without a loop turn per
step; wherever another task could run first, replay delivers in history order as always."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from natflow import WorkflowContext, workflow
from natflow._loop import WorkflowLoop
from natflow._replay import WorkflowState
from natflow_engine import History
from natflow_engine.events import Event, RunClaimed, RunStarted, StepCompleted, utcnow


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
