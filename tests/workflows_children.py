"""Parent and child workflows for the child-run tests (in-process and worker subprocesses).

Run as ``natflow worker tests.workflows_children:make_worker`` (queue ``default``) and
``natflow worker tests.workflows_children:make_other_worker`` (queue ``other``). A child's
step appends ``<run_id>:kid`` to the file named by ``NATFLOW_TEST_COUNTS`` each time its body
runs, and waits first until the file ``<NATFLOW_TEST_GATE>/<run_id>`` exists (no gate
directory: it runs at once).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import anyio
from natflow import Client, RunCancelled, RunFailed, Worker, WorkflowContext, workflow

COUNTS_ENV = "NATFLOW_TEST_COUNTS"
GATE_ENV = "NATFLOW_TEST_GATE"
LEASE_TTL = 2.0


async def kid_body(run_id: str, n: int) -> int:
    gates = os.environ.get(GATE_ENV)
    if gates:
        gate = Path(gates) / run_id
        while not gate.exists():  # noqa: ASYNC110 - the gate is opened by another process
            await anyio.sleep(0.05)
    counts = os.environ.get(COUNTS_ENV)
    if counts:
        with open(counts, "a") as out:  # noqa: ASYNC230 - one short line
            out.write(f"{run_id}:kid\n")
    if n < 0:
        raise ValueError(f"kid {n} refuses")
    return n * 10


@workflow(name="kid")
async def kid(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step("work", kid_body, ctx.run_id, n)


@workflow(name="napper")
async def napper(ctx: WorkflowContext, seconds: float) -> str:
    await ctx.sleep("nap", seconds)
    return "rested"


async def outcome(child: Awaitable[Any]) -> Any:
    """A child's result, or how it ended without one."""
    try:
        return await child
    except RunFailed as failed:
        return f"failed: {failed.error.type}"
    except RunCancelled:
        return "cancelled"


@workflow(name="family")
async def family(ctx: WorkflowContext, n: int) -> list[Any]:
    """Four children at once: one on queue ``other``, one failing, one the test cancels."""
    results = await ctx.parallel(
        outcome(ctx.child(kid, n)),
        outcome(ctx.child(kid, n + 1, queue="other")),
        outcome(ctx.child(kid, -1)),
        outcome(ctx.child(napper, 3600)),
    )
    total = await ctx.step("sum", sum_ints, [r for r in results if isinstance(r, int)])
    return [*results, total]


def sum_ints(values: list[int]) -> int:
    return sum(values)


@workflow(name="grandparent")
async def grandparent(ctx: WorkflowContext) -> Any:
    """A child that has a child of its own; cancelling this run cancels both."""
    return await ctx.child(sleepy_parent)


@workflow(name="sleepy_parent")
async def sleepy_parent(ctx: WorkflowContext) -> Any:
    return await ctx.child(napper, 3600)


@workflow(name="fanout")
async def fanout(ctx: WorkflowContext, count: int) -> int:
    results = await ctx.parallel(*(ctx.child(kid, i) for i in range(count)))
    return sum(results)


def boom() -> None:
    raise RuntimeError("boom")


@workflow(name="leaver")
async def leaver(ctx: WorkflowContext, policy: str) -> None:
    """Fails while its child sleeps: the child's parent_close policy decides its fate."""
    await ctx.parallel(ctx.child(napper, 3600, parent_close=policy), ctx.step("boom", boom))


WORKFLOWS = [kid, napper, family, grandparent, sleepy_parent, fanout, leaver]


def make_worker(client: Client) -> Worker:
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)


def make_other_worker(client: Client) -> Worker:
    return Worker(client, [kid], queue="other", lease_ttl=LEASE_TTL)
