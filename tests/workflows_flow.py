"""Workflows under flow control (README "Flow control"), for tests/test_flow_control.py.

Step bodies append one line per call to ``$FLOW_LOG`` (``<label> <epoch seconds>``), so the
test reads when every call ran from outside the worker processes.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

import anyio
import msgspec
from natflow import Debounce, RateLimit, WorkflowContext, workflow

shared_api = RateLimit("flow-test-api", limit=10, period=1.0)


def _record(label: str) -> None:
    path = os.environ.get("FLOW_LOG")
    if path:
        with open(path, "a") as out:
            out.write(f"{label} {time.time():.6f}\n")


async def call_api(i: int) -> int:
    _record(f"call-{i}")
    return i


@workflow
async def rated_calls(ctx: WorkflowContext, first: int) -> list[int]:
    """Ten calls of one API that 10/s shared by every worker allows."""
    return [await ctx.step("call", call_api, first + i, rate_limit=shared_api) for i in range(10)]


@workflow(singleton="customer")
async def one_per_customer(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return await ctx.wait_for_signal("go")


@workflow(singleton=lambda input: input["customer"])
async def one_per_customer_fn(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return await ctx.wait_for_signal("go")


@workflow(debounce=Debounce(1.0, key="doc"))
async def debounced_save(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return input


LIVE = {"now": 0, "peak": 0}


async def tracked(i: int) -> int:
    LIVE["now"] += 1
    LIVE["peak"] = max(LIVE["peak"], LIVE["now"])
    await anyio.sleep(0.02)
    LIVE["now"] -= 1
    return i


@workflow(max_parallel_steps=3)
async def wide_fanout(ctx: WorkflowContext, n: int) -> int:
    results = await ctx.parallel(*(ctx.step("item", tracked, i) for i in range(n)))
    return sum(results)


@workflow(max_parallel_steps=None)
async def unbounded_fanout(ctx: WorkflowContext, n: int) -> int:
    results = await ctx.parallel(*(ctx.step("item", tracked, i) for i in range(n)))
    return sum(results)


slow_api = RateLimit("flow-test-slow", limit=1, period=30.0)


@workflow
async def throttled_pair(ctx: WorkflowContext) -> list[int]:
    return await ctx.parallel(
        ctx.step("slow", call_api, 1, rate_limit=slow_api, rate_key="acme"),
        ctx.step("slow", call_api, 2, rate_limit=slow_api, rate_key="acme"),
    )


@workflow(rate_limit=RateLimit("flow-test-starts", limit=2, period=1.0, key="tenant"))
async def rated_start(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return input["i"]


fan_api = RateLimit("flow-test-fan", limit=200, period=1.0)


async def fan_call(i: int) -> int:
    return i


@workflow
async def rated_fanout(ctx: WorkflowContext, n: int) -> int:
    """``n`` rate-limited steps at once: each took its slot against the others of this very
    process, by revision-checked writes, and lost up to 50 times in a row (the run failed)."""
    done = await ctx.parallel(
        *(ctx.step("call", fan_call, i, rate_limit=fan_api) for i in range(n))
    )
    return len(done)


class Reading(msgspec.Struct):
    sensor: str
    at: datetime


@workflow(singleton="at")
async def one_per_instant(ctx: WorkflowContext, reading: Reading) -> str:
    return await ctx.wait_for_signal("go")
