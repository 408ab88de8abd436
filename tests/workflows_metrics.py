"""Workflows for the metrics test, served by worker processes as
``natflow worker tests.workflows_metrics:make_worker``.

Each one moves a different metric: a step that fails once and is retried, a run that fails,
a step held at a gate (for a takeover after SIGKILL), a signal wait, a sleep, and a workflow
whose first step is renamed when the file named by ``NATFLOW_TEST_FLIP`` exists (so a replay
diverges and the run is blocked).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import anyio
from natflow import Client, RetryPolicy, Worker, WorkflowContext, workflow

GATE_ENV = "NATFLOW_TEST_GATE"
FLIP_ENV = "NATFLOW_TEST_FLIP"
LEASE_TTL = 2.0

_attempts: Counter[str] = Counter()


def flaky(run_id: str, value: int) -> int:
    """Fails on its first attempt in this process, then returns ``value``."""
    _attempts[run_id] += 1
    if _attempts[run_id] == 1:
        raise ConnectionError("the first attempt always fails")
    return value


def double(value: int) -> int:
    return value * 2


def boom(value: int) -> int:
    raise ValueError(f"cannot handle {value}")


async def gated(run_id: str) -> str:
    """Waits until the test creates ``<NATFLOW_TEST_GATE>/<run_id>``."""
    gate = Path(os.environ[GATE_ENV]) / run_id
    while not gate.exists():  # noqa: ASYNC110 - the gate is opened by another process
        await anyio.sleep(0.05)
    return "opened"


@workflow(name="metered", retry=RetryPolicy(max_attempts=3, initial_interval=0.05))
async def metered(ctx: WorkflowContext, value: int) -> int:
    first = await ctx.step("flaky", flaky, ctx.run_id, value)
    return await ctx.step("double", double, first)


@workflow(name="doomed")
async def doomed(ctx: WorkflowContext, value: int) -> int:
    return await ctx.step("boom", boom, value)


@workflow(name="held")
async def held(ctx: WorkflowContext) -> str:
    return await ctx.step("hold", gated, ctx.run_id)


@workflow(name="approval")
async def approval(ctx: WorkflowContext) -> str:
    decision = await ctx.wait_for_signal("decision", timeout=60)  # a timer, cancelled
    return await ctx.step("record", shout, str(decision))


@workflow(name="napper")
async def napper(ctx: WorkflowContext, seconds: float) -> str:
    await ctx.sleep("nap", seconds)
    return "rested"


def flipped() -> bool:
    """Whether the test has "deployed" the changed code (deliberately nondeterministic)."""
    return Path(os.environ[FLIP_ENV]).exists()


def shout(text: str) -> str:
    return text.upper()


@workflow(name="drifting")
async def drifting(ctx: WorkflowContext) -> str:
    await ctx.step("renamed" if flipped() else "original", double, 1)
    return str(await ctx.wait_for_signal("go"))


WORKFLOWS = [metered, doomed, held, approval, napper, drifting]


def make_worker(client: Client) -> Worker:
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)
