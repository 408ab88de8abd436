"""A realistic mix of work, for dashboards and alerts: `natflow worker examples.traffic`.

``checkout`` reserves stock, charges a card through a payment gateway that fails now and then
(retried), rejects some orders (the run fails), waits for the parcel to settle (a durable
sleep the engine wakes) and ships. ``approval`` waits for a person's signal, with a timeout.
``ops/grafana/live_run.py`` drives a few hundred of them against ``natflow dev``.
"""

from __future__ import annotations

import random
import time

from natflow import RetryPolicy, WorkflowContext, workflow


def reserve(order: str) -> int:
    time.sleep(random.uniform(0.001, 0.01))  # a database call
    return random.randint(1, 5)


async def charge(order: str, items: int) -> str:
    if random.random() < 0.15:
        raise ConnectionError("payment gateway timed out")
    return f"ch-{order}-{items}"


def validate(order: str, reject: bool) -> None:
    if reject:
        raise ValueError(f"order {order} has an address we cannot ship to")


def ship(order: str, charge_id: str) -> str:
    time.sleep(random.uniform(0.005, 0.03))  # the carrier's API
    return f"parcel-{order}"


@workflow(name="checkout", retry=RetryPolicy(max_attempts=4, initial_interval=0.05, jitter=0.5))
async def checkout(ctx: WorkflowContext, input: dict[str, object]) -> dict[str, str]:
    order = str(input["order"])
    items = await ctx.step("reserve", reserve, order)
    await ctx.step("validate", validate, order, bool(input.get("reject")), retry=RetryPolicy())
    charge_id = await ctx.step("charge", charge, order, items)
    await ctx.sleep("settle", float(str(input.get("settle", 1.5))))
    parcel = await ctx.step("ship", ship, order, charge_id)
    return {"charge": charge_id, "parcel": parcel}


def record(decision: object) -> str:
    return "approved" if decision else "declined"


@workflow(name="approval")
async def approval(ctx: WorkflowContext, input: dict[str, object]) -> str:
    decision = await ctx.wait_for_signal("decision", timeout=float(str(input.get("timeout", 60))))
    return await ctx.step("record", record, decision)


WORKFLOWS = [checkout, approval]
