"""A new run's task that reaches a worker before its start can be read (``natflow._unseen``):
a read served by a replica that has not applied the start yet. The worker looks again
within moments; it neither drops the task nor hands it back for a second."""

from __future__ import annotations

from typing import Any

import msgspec
from natflow import Client, WorkflowContext, workflow
from natflow_engine import History, RunNotFound, Task, enqueue, ensure_streams
from natflow_engine.events import RunClaimed, RunStarted, StepCompleted, utcnow

from tests.helpers import running_worker, wait_for


async def _double(x: int) -> int:
    return 2 * x


@workflow(name="unseen_one_step")
async def one_step(ctx: WorkflowContext, x: int) -> int:
    return await ctx.step("double", _double, x)


def _behind(client: Client, worker: Any, run_id: str, start: RunStarted, reads: int) -> None:
    """The worker's first ``reads`` reads of ``run_id`` are served as before the start was
    stored; the start is stored right after them (as a lagging replica catches up)."""
    real_read = worker._store.read
    served: list[int] = []

    async def read(read_id: str, **kwargs: Any) -> History:
        history: History = await real_read(read_id, **kwargs)
        if read_id == run_id and len(served) < reads:
            served.append(len(history.events))
            if len(served) == reads:
                await client._runs.history.append(run_id, start, 0)
        return history

    worker._store.read = read


async def test_a_task_seen_before_its_start_runs_the_run_once_at_its_first_delivery(
    client: Client,
) -> None:
    """A task whose start was too large to carry inline: it was dropped as a task for an
    unknown run (the run then waited for the engine's start check, or forever)."""
    await _seen_before_its_start(client, inline=False)


async def test_an_inline_start_seen_before_it_is_readable_is_not_handed_back(
    client: Client,
) -> None:
    """A task carrying its start inline: it went back for a second (a 1 s delay)."""
    await _seen_before_its_start(client, inline=True)


async def _seen_before_its_start(client: Client, *, inline: bool) -> None:
    run_id = f"unseen-{int(inline)}"
    start = RunStarted(
        id=f"{run_id}:1",
        at=utcnow(),
        workflow=one_step.name,
        queue=one_step.queue,
        input=msgspec.Raw(b"21"),
    )
    await ensure_streams(client.connection)
    async with running_worker(client, [one_step]) as worker:
        # Inline: the claim beside the read fails, and the read after it lags too.
        _behind(client, worker, run_id, start, reads=2 if inline else 1)
        # The task as the starter writes it: a start too large to carry inline names no
        # sequence; an inline one names the sequence the start gets (no other writer here).
        info = await client.connection.jsm.stream_info("NATFLOW_HISTORY")
        seq = info.state.last_seq + 1 if inline else 0
        raw = msgspec.Raw(msgspec.json.encode(start) if inline else b"null")
        task = Task(run_id=run_id, workflow=one_step.name, reason="start", start_seq=seq, start=raw)
        await enqueue(client.connection, one_step.queue, task)
        await wait_for(lambda: _exists(client, run_id), what="the worker to read the run")
        assert await client.handle(run_id).result(timeout=10) == 42
    events = await client.history(run_id)
    claims = [e for e in events if isinstance(e, RunClaimed)]
    assert [c.delivery for c in claims] == [1], "handed back, or taken twice"
    assert sum(isinstance(e, StepCompleted) for e in events) == 1


async def _exists(client: Client, run_id: str) -> bool:
    try:
        return bool(await client.history(run_id))
    except RunNotFound:
        return False
