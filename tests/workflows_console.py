"""Workflows the console tests drive: steps the test releases one by one, a signal wait, a
failure with a traceback, and a run that waits until cancelled."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from natflow import RetryPolicy, WorkflowContext, workflow

# (run id, stage) -> the gate the test opens to let that stage's step finish
GATES: defaultdict[tuple[str, int], asyncio.Event] = defaultdict(asyncio.Event)


async def _stage(run_id: str, stage: int) -> dict[str, int]:
    await GATES[run_id, stage].wait()
    return {"stage": stage}


@workflow(queue="console")
async def pipeline(ctx: WorkflowContext, input: dict[str, Any]) -> dict[str, int]:
    """``input["stages"]`` steps, each finishing when the test opens its gate."""
    for stage in range(1, input["stages"] + 1):
        await ctx.step(f"stage-{stage}", _stage, ctx.run_id, stage)
    return {"stages": input["stages"]}


def _prepare(order: str) -> dict[str, str]:
    return {"order": order, "state": "prepared"}


def _ship(order: str, approval: Any) -> dict[str, Any]:
    return {"order": order, "shipped": True, "approved_by": approval}


@workflow(queue="console")
async def approval(ctx: WorkflowContext, input: dict[str, Any]) -> dict[str, Any]:
    """Prepares, waits for the ``approved`` signal, then ships."""
    await ctx.step("prepare", _prepare, input["order"])
    answer = await ctx.wait_for_signal("approved")
    return await ctx.step("ship", _ship, input["order"], answer)  # type: ignore[no-any-return]


class CardDeclined(Exception):
    pass


def _validate(order: str) -> dict[str, Any]:
    return {"order": order, "valid": True}


def _reserve(order: str) -> dict[str, Any]:
    return {"order": order, "reserved": 3}


def _charge(order: str, total: float) -> None:
    raise CardDeclined(f"card ending 4242 declined for {total:.2f} EUR (order {order})")


@workflow(queue="console", retry=RetryPolicy(max_attempts=2, initial_interval=0.2, jitter=0))
async def checkout(ctx: WorkflowContext, input: dict[str, Any]) -> None:
    """Validates, cools down, reserves stock, then fails charging the card (twice)."""
    await ctx.step("validate", _validate, input["order"])
    await ctx.sleep("cool-down", 0.4)
    await ctx.step("reserve-stock", _reserve, input["order"])
    await ctx.step("charge-card", _charge, input["order"], input["total"])


@workflow(queue="console")
async def greet(ctx: WorkflowContext, input: dict[str, Any]) -> str:
    return await ctx.step("greet", lambda name: f"hello {name}", input["name"])  # type: ignore[no-any-return]


WORKFLOWS = [pipeline, approval, checkout, greet]
