"""Workflows that schedules and events start, for the trigger tests."""

from __future__ import annotations

from typing import Any

import msgspec
from natflow import WorkflowContext, workflow


@workflow(queue="sched")
async def tick(ctx: WorkflowContext) -> str:
    return ctx.run_id


@workflow(queue="sched")
async def slow_tick(ctx: WorkflowContext) -> str:
    await ctx.sleep("busy", 2.5)  # open for longer than the schedule's interval
    return ctx.run_id


class Order(msgspec.Struct):
    order_id: str
    total: float


@workflow(on_event="order.created")
async def fulfil(ctx: WorkflowContext, order: Order) -> str:
    return f"fulfilled {order.order_id}"


@workflow(on_event=["order.created", "order.cancelled"])
async def audit(ctx: WorkflowContext, body: dict[str, Any]) -> dict[str, Any]:
    return body


@workflow(queue="sched", cron="0 3 * * *", timezone="Europe/Berlin")
async def nightly(ctx: WorkflowContext) -> None:
    return None


WORKFLOWS = [tick, slow_tick, fulfil, audit, nightly]
