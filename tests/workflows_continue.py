"""Workflows that continue as new, for tests/test_continue_as_new.py (in process and as
worker subprocesses: ``natflow worker tests.workflows_continue:make_worker``).

A ``tick`` step appends ``<run_id>:tick:<n>`` to the file named by ``NATFLOW_TEST_COUNTS``
(when set) each time its body runs, so a test counts executions across crashes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
from natflow import Client, Worker, WorkflowContext, workflow

COUNTS_ENV = "NATFLOW_TEST_COUNTS"
LEASE_TTL = 2.0


class Loop(msgspec.Struct):
    """``total`` ticks in stretches of ``per_stretch``; ``notes``: signals to collect at the
    end (each a ``note`` signal), ``done``: ticks so far."""

    total: int
    per_stretch: int
    notes: int = 0
    done: int = 0
    stretches: int = 1


def tick(run_id: str, n: int) -> int:
    counts = os.environ.get(COUNTS_ENV)
    if counts:
        with open(counts, "a") as out:
            out.write(f"{run_id}:tick:{n}\n")
    return n + 1


@workflow(name="looper")
async def looper(ctx: WorkflowContext, loop: Loop) -> dict[str, Any]:
    for _ in range(loop.per_stretch):
        if loop.done >= loop.total:
            break
        loop.done = await ctx.step("tick", tick, ctx.run_id, loop.done)
    if loop.done < loop.total:
        loop.stretches += 1
        ctx.continue_as_new(loop)
    notes = [await ctx.wait_for_signal("note", timeout=30) for _ in range(loop.notes)]
    return {"done": loop.done, "stretches": loop.stretches, "notes": notes}


@workflow(name="kid_looper")
async def kid_looper(ctx: WorkflowContext, results: list[int]) -> list[int]:
    results.append(await ctx.child("kid", len(results) + 1))
    if len(results) < 3:
        ctx.continue_as_new(results)
    return results


@workflow(name="napping_looper")
async def napping_looper(ctx: WorkflowContext, stretch: int) -> int:
    """Stretch 1 leaves a long sleep pending as it continues; stretch 2 sleeps a while."""
    if stretch == 1:
        pending = asyncio.ensure_future(ctx.sleep("forgotten", 3600))
        await ctx.step("tick", tick, ctx.run_id, 0)
        ctx.continue_as_new(2)
        await pending  # never reached
    await ctx.sleep("nap", 1.5)
    return stretch


@workflow(name="bad_continuer")
async def bad_continuer(ctx: WorkflowContext, n: int) -> int:
    ctx.continue_as_new("not a number")


@workflow(name="grower")
async def grower(ctx: WorkflowContext, text: str) -> str:
    """Continues with an input ten times larger until it is over 100,000 characters."""
    if len(text) < 100_000:
        ctx.continue_as_new(text * 10)
    return f"{len(text)} characters"


@workflow(name="hoarder")
async def hoarder(ctx: WorkflowContext, count: int) -> list[int]:
    """Stretch 1 waits for 'go' (the notes sent before it are moved in, not taken) and
    continues; stretch 2 takes ``count`` notes: all carried by run_continued."""
    if count > 0:
        await ctx.wait_for_signal("go", timeout=30)
        ctx.continue_as_new(-count)
    return [len(await ctx.wait_for_signal("note", timeout=30)) for _ in range(-count)]


@workflow(name="take_one")
async def take_one(ctx: WorkflowContext, taken: list[int]) -> list[int]:
    """One signal per stretch; the others were moved in already and are carried on."""
    taken = [*taken, await ctx.wait_for_signal("s", timeout=30)]
    if len(taken) < 4:
        ctx.continue_as_new(taken)
    return taken


@workflow(name="swallower")
async def swallower(ctx: WorkflowContext, n: int) -> int:
    """An ``except Exception`` around continue_as_new must not stop it."""
    if n == 0:
        try:
            ctx.continue_as_new(1)
        except Exception:
            return -1
    return n


@workflow(name="stubborn")
async def stubborn(ctx: WorkflowContext, n: int) -> int:
    """Tries to continue as new when cancelled: the cancellation must win."""
    try:
        await ctx.sleep("long", 3600)
    except asyncio.CancelledError:
        ctx.continue_as_new(n + 1)
    return n


@workflow(name="kid")
async def kid(ctx: WorkflowContext, n: int) -> int:
    return await ctx.step("work", tick, ctx.run_id, n * 10 - 1)


WORKFLOWS = [
    looper,
    kid_looper,
    napping_looper,
    bad_continuer,
    grower,
    hoarder,
    take_one,
    swallower,
    stubborn,
    kid,
]


def make_worker(client: Client) -> Worker:
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)
