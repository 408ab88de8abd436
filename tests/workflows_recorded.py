"""A workflow with every kind of command, whose recorded histories tests/histories/ replays."""

from __future__ import annotations

import anyio
from natflow import (
    Debounce,
    RateLimit,
    RetryPolicy,
    RunFailed,
    SignalTimeout,
    WorkflowContext,
    workflow,
)


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


_CHARGES: list[int] = []  # calls of flaky_charge in this process (only while recording)


def flaky_charge(amount: int) -> dict[str, int]:
    """Fails its first two calls: recorded as two step_retrying events, then a result."""
    _CHARGES.append(amount)
    if len(_CHARGES) <= 2:
        raise ConnectionError(f"gateway busy (call {len(_CHARGES)})")
    return {"charged": amount}


@workflow(name="recorded_retry")
async def recorded_retry(ctx: WorkflowContext, amount: int) -> dict[str, int]:
    policy = RetryPolicy(max_attempts=3, initial_interval=0.05, backoff_coefficient=1.0, jitter=0)
    return await ctx.step("charge", flaky_charge, amount, retry=policy)


@workflow(name="recorded_patch")
async def recorded_patch(ctx: WorkflowContext, x: int) -> str:
    """Version 2: runs recorded by version 1 (no patch) replay down the old path."""
    a = await ctx.step("double", double, x)
    extra = 0
    if ctx.patched("add-extra"):
        extra = await ctx.step("extra", double, 0)
    go = await ctx.wait_for_signal("go")
    return f"{a + extra} {go}"


@workflow(name="recorded_patch")
async def recorded_patch_v1(ctx: WorkflowContext, x: int) -> str:
    """Version 1 of ``recorded_patch``, which recorded ``recorded-patch-old``."""
    a = await ctx.step("double", double, x)
    go = await ctx.wait_for_signal("go")
    return f"{a} {go}"


@workflow(name="recorded_cancel")
async def recorded_cancel(ctx: WorkflowContext, x: int) -> int:
    """Cancelled before any worker ran it: its first step never runs, its cleanup does."""
    try:
        return await ctx.step("first", double, x)
    finally:
        await ctx.step("cleanup", double, x)


def triple(x: int) -> int:
    return 3 * x


def refuse(x: int) -> int:
    raise ValueError(f"refused {x}")


@workflow(name="recorded_kid")
async def recorded_kid(ctx: WorkflowContext, x: int) -> int:
    if x < 0:
        return await ctx.step("refuse", refuse, x)
    return await ctx.step("triple", triple, x)


@workflow(name="recorded_children")
async def recorded_children(ctx: WorkflowContext, x: int) -> dict[str, object]:
    """A child that completes and one that fails (recorded: child_started, child_completed,
    child_failed), then a step after both."""
    good = await ctx.child(recorded_kid, x)
    try:
        await ctx.child("recorded_kid", -x)
        bad = "no error"
    except RunFailed as failed:
        bad = failed.error.type
    after = await ctx.step("double", double, good)
    return {"good": good, "bad": bad, "after": after}


def shout(text: str) -> str:
    return text.upper()


@workflow(name="recorded_values")
async def recorded_values(ctx: WorkflowContext, text: str) -> dict[str, object]:
    """Its input and its step's result are over 64 KiB: history holds references to them."""
    grown = await ctx.step("shout", shout, text)
    return {"input": len(text), "grown": len(grown), "head": grown[:16]}


@workflow(name="recorded_pause", retention=3600)
async def recorded_pause(ctx: WorkflowContext, x: int) -> dict[str, object]:
    """Recorded paused during its nap and resumed after it fell due (run_paused/run_resumed)."""
    a = await ctx.step("double", double, x)
    await ctx.sleep("nap", 0.5)
    b = await ctx.step("double", double, a)
    return {"a": a, "b": b}


_FLOW_API = RateLimit("recorded-flow-api", limit=1, period=1.0)


@workflow(name="recorded_flow", debounce=Debounce(0.3, key="doc"))
async def recorded_flow(ctx: WorkflowContext, input: dict[str, int | str]) -> dict[str, object]:
    """Debounced (its input comes from the natflow-debounce step); its second call waits
    about a second for the rate limit (a step_started with rate_limited_until)."""
    v = int(input["v"])
    a = await ctx.step("call", double, v, rate_limit=_FLOW_API)
    b = await ctx.step("call", double, v + 1, rate_limit=_FLOW_API, rate_key=None)
    return {"input": input, "a": a, "b": b}


@workflow(name="recorded_continue")
async def recorded_continue(ctx: WorkflowContext, state: dict[str, int]) -> dict[str, object]:
    """Continues as new twice (recorded: the last stretch, opened by run_continued). The
    first stretch takes 'go' and leaves 'extra', which arrived before it, untaken: the
    run_continued events carry it and the last stretch takes it."""
    n = state["n"]
    total = await ctx.step("double", double, state["total"] + n)
    if n == 1:
        await ctx.wait_for_signal("go", timeout=30)
    if n < 3:
        ctx.continue_as_new({"n": n + 1, "total": total})
    extra = await ctx.wait_for_signal("extra", timeout=30)
    return {"total": total, "extra": extra, "n": n}


LONG_FIRST_TIME: list[bool] = [True]  # the first attempt outlasts its worker's grace
SLOW_BEGAN: list[bool] = []  # set once that attempt's body runs


async def slow_once(x: int) -> int:
    if LONG_FIRST_TIME[0]:
        LONG_FIRST_TIME[0] = False
        SLOW_BEGAN.append(True)
        await anyio.sleep(60)
    return x + 1


@workflow(name="recorded_released")
async def recorded_released(ctx: WorkflowContext, x: int) -> int:
    """Its first worker stops while ``slow`` runs: history records ``run_released``."""
    a = await ctx.step("double", double, x)
    return await ctx.step("slow", slow_once, a)
