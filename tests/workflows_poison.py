"""Workflows whose user code misbehaves, served by worker subprocesses in tests/test_poison.py.

Run as ``natflow worker tests.workflows_poison:make_worker``. Step bodies append one line
``<run_id>:<step>:<pid>`` per execution to the file named by ``NATFLOW_TEST_COUNTS``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import anyio
from natflow import Client, Worker, WorkflowContext, workflow

COUNTS_ENV = "NATFLOW_TEST_COUNTS"
LEASE_TTL = 2.0


def _count(run_id: str, step: str) -> None:
    with open(os.environ[COUNTS_ENV], "a") as out:
        out.write(f"{run_id}:{step}:{os.getpid()}\n")


async def exits(run_id: str) -> int:
    _count(run_id, "exits")
    sys.exit(3)


def interrupts(run_id: str) -> int:
    _count(run_id, "interrupts")
    raise KeyboardInterrupt


class Custom(BaseException):
    pass


async def raises_base(run_id: str) -> int:
    _count(run_id, "raises_base")
    raise Custom("not an Exception")


async def cancels_itself(run_id: str) -> int:
    _count(run_id, "cancels_itself")
    raise asyncio.CancelledError  # as a library's own timeout might: not a cancellation


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def unprintable(run_id: str) -> int:
    _count(run_id, "unprintable")
    raise Unprintable


def generator_exit(run_id: str) -> int:
    _count(run_id, "generator_exit")
    raise GeneratorExit("from a sync step")  # anyio passed it from the thread to the worker


def kills(run_id: str) -> int:
    _count(run_id, "kills")
    os._exit(7)  # the process ends here, as a crash in native code would end it


def double(run_id: str, x: int) -> int:
    _count(run_id, "double")
    return x * 2


async def sleeps_blocking(run_id: str, seconds: float) -> str:
    _count(run_id, "sleeps_blocking")
    time.sleep(seconds)  # noqa: ASYNC251 - the point: a blocking call in an async step
    return "slept"


@workflow(name="base_steps")
async def base_steps(ctx: WorkflowContext, kind: str) -> str:
    fn = {
        "exit": exits,
        "interrupt": interrupts,
        "base": raises_base,
        "cancelled": cancels_itself,
        "unprintable": unprintable,
        "genexit": generator_exit,
    }[kind]
    await ctx.step(kind, fn, ctx.run_id)
    return "unreachable"


@workflow(name="exits_itself")
async def exits_itself(ctx: WorkflowContext, code: int) -> None:
    await ctx.step("double", double, ctx.run_id, code)
    raise SystemExit(code)


@workflow(name="unprintable_end")
async def unprintable_end(ctx: WorkflowContext, _: int) -> None:
    raise Unprintable  # held as blocked, its task failing, until error_info survived it


@workflow(name="poison")
async def poison(ctx: WorkflowContext, _: int) -> None:
    await ctx.step("kills", kills, ctx.run_id)


@workflow(name="doubler")
async def doubler(ctx: WorkflowContext, x: int) -> int:
    return await ctx.step("double", double, ctx.run_id, x)


@workflow(name="blocker")
async def blocker(ctx: WorkflowContext, seconds: float) -> str:
    return await ctx.step("sleeps_blocking", sleeps_blocking, ctx.run_id, seconds)


@workflow(name="waiter")
async def waiter(ctx: WorkflowContext, _: int) -> int:
    got = await ctx.wait_for_signal("go")
    return await ctx.step("double", double, ctx.run_id, got)


@workflow(name="napper")
async def napper(ctx: WorkflowContext, x: int) -> int:
    await ctx.sleep("nap", 1.5)
    return await ctx.step("double", double, ctx.run_id, x)


WORKFLOWS = [base_steps, exits_itself, unprintable_end, poison, doubler, blocker, waiter, napper]


def make_worker(client: Client) -> Worker:
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)


def lists_a_folder() -> None:
    # A file name that is not UTF-8, as os.listdir hands it over (surrogateescape).
    name = b"report-\xff.csv".decode(errors="surrogateescape")
    raise FileNotFoundError(f"no such file: {name}")


@workflow(name="not_text")
async def not_text(ctx: WorkflowContext, kind: str) -> None:
    if kind == "step_name":
        await ctx.step("\ud800", double, ctx.run_id, 1)  # no event could hold this name
    await ctx.step("list", lists_a_folder)


@workflow(name="awaits_a_thread")
async def awaits_a_thread(ctx: WorkflowContext, _: int) -> int:
    import anyio.to_thread

    return await anyio.to_thread.run_sync(lambda: 1)  # no wake-up can reach workflow code


async def slow(run_id: str) -> int:
    _count(run_id, "slow")
    await asyncio.sleep(2.0)
    return 1


@workflow(name="slow_step")
async def slow_step(ctx: WorkflowContext, _: int) -> int:
    return await ctx.step("slow", slow, ctx.run_id)


WORKFLOWS.append(slow_step)


async def long_step(run_id: str, seconds: float) -> str:
    _count(run_id, "long_step")
    await anyio.sleep(seconds)
    return "done"


@workflow(name="long_runner")
async def long_runner(ctx: WorkflowContext, seconds: float) -> str:
    return await ctx.step("long_step", long_step, ctx.run_id, seconds)


WORKFLOWS.append(long_runner)


def sleeps_in_a_thread(run_id: str, seconds: float) -> str:
    _count(run_id, "sleeps_in_a_thread")
    time.sleep(seconds)  # a sync step: its thread cannot be stopped
    return "slept"


@workflow(name="thread_sleeper")
async def thread_sleeper(ctx: WorkflowContext, seconds: float) -> str:
    return await ctx.step("sleeps_in_a_thread", sleeps_in_a_thread, ctx.run_id, seconds)


WORKFLOWS.append(thread_sleeper)
