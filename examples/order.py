"""An order: several steps, a parallel pair, and a step error the workflow handles."""

from __future__ import annotations

import asyncio

import msgspec
from natflow import Client, RunHandle, StepError, WorkflowContext, workflow


class OrderInput(msgspec.Struct):
    order_id: str
    user_id: int
    total: float
    email: str
    coupon: str | None = None


class Receipt(msgspec.Struct):
    order_id: str
    charge_id: str
    items: int
    discount: float
    notified: bool


def reserve_stock(order_id: str) -> dict[str, int]:
    return {"items": 3}


async def charge_card(order_id: str, total: float) -> dict[str, object]:
    await asyncio.sleep(0.01)  # a call to the payment provider
    return {"ok": True, "id": f"ch-{order_id}", "amount": total}


def fetch_user(user_id: int) -> dict[str, object]:
    return {"id": user_id, "name": "Ada"}


def fetch_orders(user_id: int) -> list[str]:
    return ["o-1", "o-2"]


def apply_coupon(code: str | None) -> float:
    if code != "WELCOME10":
        raise ValueError(f"coupon {code!r} is not valid")
    return 0.1


def send_email(address: str, charge_id: str) -> bool:
    return True


@workflow(name="order", queue="default")
async def order(ctx: WorkflowContext, input: OrderInput) -> Receipt:
    stock = await ctx.step("reserve", reserve_stock, input.order_id)
    user, orders = await ctx.parallel(
        ctx.step("user", fetch_user, input.user_id),
        ctx.step("orders", fetch_orders, input.user_id),
    )
    ctx.logger.info("user %s has %d earlier orders", user["name"], len(orders))
    try:
        discount = await ctx.step("coupon", apply_coupon, input.coupon)
    except StepError as error:  # a failed step is recorded once and handled like any error
        ctx.logger.info("no discount: %s", error.error.message)
        discount = 0.0
    payment = await ctx.step("charge", charge_card, input.order_id, input.total * (1 - discount))
    notified = False
    if payment["ok"]:
        notified = await ctx.step("notify", send_email, input.email, payment["id"])
    return Receipt(
        order_id=input.order_id,
        charge_id=str(payment["id"]),
        items=stock["items"],
        discount=discount,
        notified=notified,
    )


async def demo(client: Client) -> list[RunHandle]:
    """Start this example's runs (used by `make demo` and the example tests)."""
    good = OrderInput(
        order_id="A-1", user_id=7, total=42.0, email="ada@example.com", coupon="WELCOME10"
    )
    bad = OrderInput(order_id="A-2", user_id=7, total=10.0, email="ada@example.com", coupon="BOGUS")
    return [
        await client.start(order, good, run_id="demo-order-a1"),
        await client.start(order, bad, run_id="demo-order-a2"),
    ]
