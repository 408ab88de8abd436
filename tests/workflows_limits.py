"""Workflows with concurrency limits, served in-process and by worker subprocesses.

Run as ``natflow worker tests.workflows_limits:make_worker``. Step bodies append one line
``<group> <start> <end> <run_id> <pid>`` per execution to the file named by
``NATFLOW_LIMITS_LOG`` (wall-clock seconds), so a test checks from outside every worker
how many runs of a group executed at once. A held step waits until the file
``<NATFLOW_LIMITS_GATE>/<run_id>`` (or ``.../all``) exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
from natflow import Client, Limit, Worker, WorkflowContext, workflow

LOG_ENV = "NATFLOW_LIMITS_LOG"
GATE_ENV = "NATFLOW_LIMITS_GATE"
LEASE_TTL = 2.0


def record(group: str, run_id: str, started: float) -> str:
    """Append one execution interval (outside the worker) and return the group."""
    line = f"{group} {started:.6f} {time.time():.6f} {run_id} {os.getpid()}\n"
    with open(os.environ[LOG_ENV], "a") as out:
        out.write(line)
    return group


async def work(group: str, run_id: str, seconds: float) -> str:
    started = time.time()
    await anyio.sleep(seconds)
    return record(group, run_id, started)


async def held(group: str, run_id: str) -> str:
    """Runs until the test opens this run's gate (or the gate ``all``)."""
    started = time.time()
    gates = Path(os.environ[GATE_ENV])
    (gates / f"began-{run_id}").touch()  # a slot is held before its body begins
    while not (gates / run_id).exists() and not (gates / "all").exists():  # noqa: ASYNC110
        await anyio.sleep(0.02)
    return record(group, run_id, started)


@workflow(concurrency=Limit(max=2, key="key"))
async def per_key(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """At most 2 runs per ``key`` at once, whichever worker runs them."""
    seconds = float(input.get("seconds", 0.05))
    return await ctx.step("work", work, str(input["key"]), ctx.run_id, seconds)


@workflow(concurrency=Limit(max=2))
async def gated_pair(ctx: WorkflowContext, input: str) -> str:
    """At most 2 runs at once; each holds its slot until its gate opens."""
    return await ctx.step("held", held, "pair", ctx.run_id)


@workflow(concurrency=Limit(max=1))
async def one_at_a_time(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("held", held, "one", ctx.run_id)


@workflow(concurrency=[Limit(max=3), Limit(max=2, key="key")])
async def total_and_key(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """At most 3 runs at once in all, and at most 2 of one key."""
    seconds = float(input.get("seconds", 0.05))
    return await ctx.step("work", work, str(input["key"]), ctx.run_id, seconds)


@workflow(concurrency=[Limit(max=1), Limit(max=10, key="key")])
async def fair_total(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    """One run at a time in all; its slot goes round-robin over the keys of those waiting."""
    return await ctx.step("held", held, "fair", ctx.run_id)


@workflow(concurrency=Limit(max=1))
async def sleeper(ctx: WorkflowContext, input: str) -> str:
    """Sleeps between two steps: while it sleeps another run may use the slot."""
    await ctx.step("before", work, "sleeper", ctx.run_id, 0.0)
    await ctx.sleep("nap", 2.0)
    return await ctx.step("after", work, "sleeper", ctx.run_id, 0.0)


@workflow(concurrency=Limit(max=1, hold_while_waiting=True))
async def keeper(ctx: WorkflowContext, input: str) -> str:
    """Like :func:`sleeper`, but its slot stays taken while it sleeps."""
    await ctx.step("before", work, "keeper", ctx.run_id, 0.0)
    await ctx.sleep("nap", 1.5)
    return await ctx.step("after", work, "keeper", ctx.run_id, 0.0)


@workflow(queue="shared", concurrency=Limit(max=1, scope="queue"))
async def queue_one(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("held", held, "queue", ctx.run_id)


@workflow(queue="shared", concurrency=Limit(max=1, scope="queue"))
async def queue_two(ctx: WorkflowContext, input: str) -> str:
    """Shares the one slot of queue ``shared`` with :func:`queue_one`."""
    return await ctx.step("held", held, "queue", ctx.run_id)


@workflow
async def unlimited(ctx: WorkflowContext, input: int) -> int:
    return await ctx.step("double", lambda x: x * 2, input)


WORKFLOWS = [
    per_key,
    gated_pair,
    one_at_a_time,
    total_and_key,
    fair_total,
    sleeper,
    keeper,
    queue_one,
    queue_two,
    unlimited,
]


def make_worker(client: Client) -> Worker:
    """The ``natflow worker`` factory: these workflows with a short lease."""
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)


async def _capped(ctx: WorkflowContext, input: str) -> str:
    return await ctx.step("held", held, "capped", ctx.run_id)


# One workflow, deployed with a max of 3 and then of 1 (or the other way round).
capped_at_3 = workflow(name="capped", concurrency=Limit(max=3))(_capped)
capped_at_1 = workflow(name="capped", concurrency=Limit(max=1))(_capped)
