"""A workflow with every kind of command, whose recorded histories tests/histories/ replays."""

from __future__ import annotations

from natflow import SignalTimeout, WorkflowContext, workflow


def double(x: int) -> int:
    return 2 * x


@workflow(name="recorded_mix")
async def recorded_mix(ctx: WorkflowContext, x: int) -> dict[str, object]:
    a, b = await ctx.parallel(ctx.step("double", double, x), ctx.step("double", double, x + 1))
    await ctx.sleep("nap", 0.05)
    approval = await ctx.wait_for_signal("approve", timeout=30)
    try:
        late = await ctx.wait_for_signal("never", timeout=0.05)
    except SignalTimeout:
        late = None
    token = str(ctx.uuid4())
    return {"a": a, "b": b, "approval": approval, "late": late, "token": token}


@workflow(name="recorded_pause", retention=3600)
async def recorded_pause(ctx: WorkflowContext, x: int) -> dict[str, object]:
    """Recorded paused during its nap and resumed after it fell due (run_paused/run_resumed)."""
    a = await ctx.step("double", double, x)
    await ctx.sleep("nap", 0.5)
    b = await ctx.step("double", double, a)
    return {"a": a, "b": b}
