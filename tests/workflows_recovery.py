"""Workflows for the recovery tests, served by real worker processes.

Every step body appends ``<event> <run_id> <step> <pid> <unix time>`` lines (``start`` and
``end``) to the file named by ``NATFLOW_TEST_LOG``, so a test sees each execution, which
process ran it and when, from outside the workers and across kills.
"""

from __future__ import annotations

import os
import time

import anyio
from natflow import Client, Worker, WorkflowContext, workflow

LOG_ENV = "NATFLOW_TEST_LOG"
LEASE_ENV = "NATFLOW_TEST_LEASE"


def _log(event: str, run_id: str, step: str) -> None:
    with open(os.environ[LOG_ENV], "a") as out:
        out.write(f"{event} {run_id} {step} {os.getpid()} {time.time():.6f}\n")


async def work(run_id: str, step: str, seconds: float) -> str:
    _log("start", run_id, step)
    await anyio.sleep(seconds)
    _log("end", run_id, step)
    return f"{step}@{os.getpid()}"


@workflow(name="slow_chain")
async def slow_chain(ctx: WorkflowContext, seconds: float) -> list[str]:
    first = await ctx.step("first", work, ctx.run_id, "first", 0.0)
    slow = await ctx.step("slow", work, ctx.run_id, "slow", seconds)
    last = await ctx.step("last", work, ctx.run_id, "last", 0.0)
    return [first, slow, last]


@workflow(name="five_steps")
async def five_steps(ctx: WorkflowContext, seconds: float) -> int:
    for i in range(5):
        await ctx.step(f"s{i}", work, ctx.run_id, f"s{i}", seconds)
    return 5


WORKFLOWS = [slow_chain, five_steps]


def make_worker(client: Client) -> Worker:
    return Worker(
        client,
        WORKFLOWS,
        lease_ttl=float(os.environ.get(LEASE_ENV, "15")),
        max_concurrent_runs=200,
    )
