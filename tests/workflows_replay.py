"""Workflows served by worker subprocesses in the replay and retry tests.

Run as ``natflow worker tests.workflows_replay:make_worker``. Step bodies append one line
``<run_id>:<step>`` per execution to the file named by ``NATFLOW_TEST_COUNTS`` (as in
``workflows_proc``); a step named ``hold-<n>`` waits until the file
``<NATFLOW_TEST_GATE>/<run_id>-<n>`` exists, so a test can kill the worker while it runs.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from natflow import Client, RetryPolicy, Worker, WorkflowContext, workflow

from tests.workflows_proc import COUNTS_ENV, GATE_ENV, count

__all__ = ["COUNTS_ENV", "GATE_ENV", "chatty", "flaky", "make_worker"]

LEASE_TTL = 2.0
BACKOFF = 2.5  # seconds between attempts of flaky's step: longer than a worker holds a run


def decline(run_id: str) -> None:
    count(run_id, "charge", 0)
    raise RuntimeError("card declined")


@workflow(name="flaky")
async def flaky(ctx: WorkflowContext) -> None:
    policy = RetryPolicy(
        max_attempts=3, initial_interval=BACKOFF, backoff_coefficient=1.0, jitter=0
    )
    await ctx.step("charge", decline, ctx.run_id, retry=policy)


async def hold(run_id: str, n: int) -> int:
    """Count, then wait at gate ``n`` (the test kills the worker there, or opens it)."""
    import os

    count(run_id, f"step{n}", n)
    gate = Path(os.environ[GATE_ENV]) / f"{run_id}-{n}"
    while not gate.exists():  # noqa: ASYNC110 - the gate is opened by another process
        await anyio.sleep(0.05)
    return n


@workflow(name="chatty")
async def chatty(ctx: WorkflowContext) -> str:
    """Logs one line before each of its commands; the kill test counts them across workers."""
    for n in (1, 2, 3):
        ctx.logger.warning("line before step %d", n)
        await ctx.step(f"step{n}", hold, ctx.run_id, n)
    ctx.logger.warning("line before sleep")
    await ctx.sleep("nap", 1.5)
    ctx.logger.warning("line before wait")
    go = await ctx.wait_for_signal("go")
    ctx.logger.warning("line before end")
    return f"done {go}"


def make_worker(client: Client) -> Worker:
    """The ``natflow worker`` factory: these workflows with a short lease (and ack deadline)."""
    return Worker(client, [flaky, chatty], lease_ttl=LEASE_TTL)
