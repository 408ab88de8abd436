"""Where no worker takes a queue's new runs from history yet (no start consumer), a new run's
task is written without waiting for its acknowledgement (``send_start_task``): ``start()``
waits for the start's write alone, and a task write that is lost costs the run the engine's
start grace, never the start."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine import TASK_PREFIX, decode_task
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine.events import RunClaimed

from tests.helpers import overheard, running_worker


async def _double(x: int) -> int:
    return 2 * x


@workflow(name="start_task_one_step")
async def one_step(ctx: WorkflowContext, x: int) -> int:
    return await ctx.step("double", _double, x)


async def test_a_starts_task_asks_for_no_acknowledgement(client: Client) -> None:
    async with overheard(client, f"{TASK_PREFIX}.>") as sent:
        handle = await client.start(one_step, 21, run_id="st-1")  # before any worker
        async with running_worker(client, [one_step]):
            assert await handle.result(timeout=10) == 42
    assert [m.reply for m in sent] == [""]  # a plain publish: no reply subject, no ack
    task = decode_task(sent[0].data)
    start_seq = (await HistoryStore(client.connection).read("st-1")).last_seq
    assert task.run_id == "st-1" and task.reason == "start"
    assert 0 < task.start_seq < start_seq  # the start's sequence: claimed without a read
    claims = [e for e in await client.history("st-1") if isinstance(e, RunClaimed)]
    assert [c.delivery for c in claims] == [1]


async def test_a_task_that_is_not_sent_costs_the_run_the_start_grace_not_the_start(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    nc = client.connection.nc
    publish = nc.publish

    async def no_tasks(subject: str, *args: Any, **kwargs: Any) -> None:
        if subject.startswith(f"{TASK_PREFIX}."):
            raise nats.errors.ConnectionClosedError
        await publish(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "publish", no_tasks)
    with caplog.at_level(logging.WARNING, logger="natflow.tasks"):
        handle = await client.start(one_step, 4, run_id="st-2")  # before any worker
    monkeypatch.setattr(nc, "publish", publish)
    assert any("st-2: its task was not sent" in r.getMessage() for r in caplog.records)
    async with running_worker(client, [one_step]):
        # The engine enqueues the task of a start still alone after its grace (5 s).
        assert await handle.result(timeout=20) == 8
