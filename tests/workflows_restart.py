"""A four-step workflow whose third step has a bug while ``NATFLOW_TEST_BUG`` is set.

Served by worker subprocesses (``natflow worker tests.workflows_restart``); each step body
appends ``<run_id>:<step>`` to the file named by ``NATFLOW_TEST_COUNTS`` per execution.
"""

from __future__ import annotations

import os

from natflow import WorkflowContext, workflow

from tests.workflows_proc import count


def third(run_id: str, value: int) -> int:
    if os.environ.get("NATFLOW_TEST_BUG") == "1":
        count(run_id, "three", 0)
        raise ZeroDivisionError("the bug in step three")
    return count(run_id, "three", value)


@workflow(name="four_steps")
async def four_steps(ctx: WorkflowContext, x: int) -> list[int]:
    one = await ctx.step("one", count, ctx.run_id, "one", x)
    two = await ctx.step("two", count, ctx.run_id, "two", one + 1)
    three = await ctx.step("three", third, ctx.run_id, two + 1)
    four = await ctx.step("four", count, ctx.run_id, "four", three + 1)
    return [one, two, three, four]


@workflow(name="charge")
async def charge(ctx: WorkflowContext, amount: int) -> int:
    return int(await ctx.step("charge", count, ctx.run_id, "charge", amount))


def ship(run_id: str, charged: int) -> int:
    if os.environ.get("NATFLOW_TEST_BUG") == "1":
        raise ZeroDivisionError("the bug in shipping")
    return count(run_id, "ship", charged)


@workflow(name="order_with_child")
async def order_with_child(ctx: WorkflowContext, amount: int) -> int:
    charged = await ctx.child(charge, amount)
    return int(await ctx.step("ship", ship, ctx.run_id, charged))
