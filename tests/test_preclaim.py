"""A new run's claim goes out beside its history read (``natflow._preclaim``): it fences as
a claim written after the read would, and one that meets a newer history falls back."""

from __future__ import annotations

import logging

import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine._history import HistoryStore
from natflow_engine.events import RunClaimed, RunStarted, StepCompleted, utcnow

from tests.helpers import running_worker

_STEPS = 2


async def _one(x: int) -> int:
    return x + 1


@workflow(name="preclaim_two_steps")
async def two_steps(ctx: WorkflowContext, x: int) -> int:
    for _ in range(_STEPS):
        x = await ctx.step("add", _one, x)
    return x


async def test_a_new_run_is_claimed_once_beside_its_read(client: Client) -> None:
    async with running_worker(client, [two_steps]) as worker:
        handle = await client.start(two_steps, 1, run_id="pre-1")
        assert await handle.result(timeout=10) == 3
    events = await client.history("pre-1")
    claims = [e for e in events if isinstance(e, RunClaimed)]
    assert [c.worker for c in claims] == [worker.identity]
    assert [type(e) for e in events[:2]] == [RunStarted, RunClaimed]
    assert sum(isinstance(e, StepCompleted) for e in events) == _STEPS


async def test_a_claim_that_meets_a_newer_history_falls_back(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await client.start(two_steps, 1, run_id="pre-2")  # its task: start inline
    store = HistoryStore(client.connection)
    last = await store.last("pre-2")
    assert last is not None and isinstance(last[0], RunStarted)
    # Another worker claimed the run (and died) before this task is taken: the claim beside
    # the read expects the start as the run's last event, so it fails and the worker reads
    # the run again and claims after the other claim.
    other = RunClaimed(id="pre-2:2", at=utcnow(), worker="gone-worker", delivery=1)
    await store.append("pre-2", other, last[1])
    with caplog.at_level(logging.DEBUG, logger="natflow.worker"):
        async with running_worker(client, [two_steps]) as worker:
            assert await handle.result(timeout=10) == 3
    assert any("claim beside the read did not hold" in r.getMessage() for r in caplog.records)
    events = await client.history("pre-2")
    claims = [e.worker for e in events if isinstance(e, RunClaimed)]
    assert claims == ["gone-worker", worker.identity]
    assert sum(isinstance(e, StepCompleted) for e in events) == _STEPS
