"""Workflows served by worker subprocesses in the process tests.

Run as ``natflow worker tests.workflows_proc:make_worker`` (or ``:WORKFLOWS``). Step bodies
append one line ``<run_id>:<step>`` per execution to the file named by ``NATFLOW_TEST_COUNTS``,
so a test counts executions outside the worker, across crashes. A gated step waits until the
file ``<NATFLOW_TEST_GATE>/<run_id>`` exists before it runs its body.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
from natflow import Client, Worker, WorkflowContext, workflow

COUNTS_ENV = "NATFLOW_TEST_COUNTS"
GATE_ENV = "NATFLOW_TEST_GATE"
LEASE_TTL = 2.0  # short: a killed worker's task comes back (ack deadline) quickly


def count(run_id: str, step: str, value: int) -> int:
    """Record one execution of ``step`` (outside the worker) and return ``value``."""
    with open(os.environ[COUNTS_ENV], "a") as out:
        out.write(f"{run_id}:{step}\n")
    return value


async def gated(run_id: str, step: str, value: int) -> int:
    """Wait until the test opens this run's gate, then count like :func:`count`."""
    gate = Path(os.environ[GATE_ENV]) / run_id
    while not gate.exists():  # noqa: ASYNC110 - the gate is opened by another process
        await anyio.sleep(0.05)
    return count(run_id, step, value)


@workflow(name="crash_counter")
async def crash_counter(ctx: WorkflowContext, input: int) -> dict[str, int]:
    one = await ctx.step("one", count, ctx.run_id, "one", input)
    two = await ctx.step("two", count, ctx.run_id, "two", one + 1)
    three = await ctx.step("three", gated, ctx.run_id, "three", two + 1)
    return {"one": one, "two": two, "three": three}


@workflow(name="single_step")
async def single_step(ctx: WorkflowContext, input: int) -> int:
    return await ctx.step("only", count, ctx.run_id, "only", input * 2)


WORKFLOWS = [crash_counter, single_step]


def make_worker(client: Client) -> Worker:
    """The ``natflow worker`` factory: these workflows with a short lease (and ack deadline)."""
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)


def make_single_worker(client: Client) -> Worker:
    """Like :func:`make_worker`, holding one run at a time (it takes no task while it does)."""
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL, max_concurrent_runs=1)


def make_nothing(client: Client) -> Worker | int:
    """A factory that makes no Worker after all: each worker process says so and exits with
    status 1."""
    return 42


def make_two(first: object, second: object) -> Worker:
    """A factory (it says it makes a Worker) natflow cannot call: it takes two arguments."""
    raise AssertionError("natflow never calls it")
