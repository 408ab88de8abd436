"""Three versions of one workflow, for ``natflow replay-check`` (tests/test_replay_check.py).

``v1`` is what the stored runs ran; ``incompatible`` adds a step before the signal wait without
a guard; ``patched`` adds the same step behind ``ctx.patched``, which old runs skip.
"""

from __future__ import annotations

from natflow import WorkflowContext, workflow


def reserve(item: str) -> str:
    return f"reserved {item}"


@workflow(name="shipment")
async def v1(ctx: WorkflowContext, item: str) -> str:
    reserved = await ctx.step("reserve", reserve, item)
    go = await ctx.wait_for_signal("ship")
    return f"{reserved}, shipped {go}"


@workflow(name="shipment")
async def incompatible(ctx: WorkflowContext, item: str) -> str:
    reserved = await ctx.step("reserve", reserve, item)
    await ctx.step("insure", reserve, item)
    go = await ctx.wait_for_signal("ship")
    return f"{reserved}, shipped {go}"


@workflow(name="shipment")
async def patched(ctx: WorkflowContext, item: str) -> str:
    reserved = await ctx.step("reserve", reserve, item)
    if ctx.patched("insure"):
        await ctx.step("insure", reserve, item)
    go = await ctx.wait_for_signal("ship")
    return f"{reserved}, shipped {go}"
