"""A three-step workflow for the chaos test: each step body appends ``<run>:<step>:<pid>``
to the file named by ``NATFLOW_TEST_COUNTS``, once per execution."""

from __future__ import annotations

import os
import time

from natflow import Client, Worker, WorkflowContext, workflow

COUNTS_ENV = "NATFLOW_TEST_COUNTS"


def work(run_id: str, step: str, value: int) -> int:
    time.sleep(0.05)  # long enough that steps are in flight when a leader dies
    with open(os.environ[COUNTS_ENV], "a") as out:
        out.write(f"{run_id}:{step}:{os.getpid()}\n")
    return value + 1


@workflow(name="chaos_steps")
async def chaos_steps(ctx: WorkflowContext, x: int) -> int:
    a = await ctx.step("a", work, ctx.run_id, "a", x)
    b = await ctx.step("b", work, ctx.run_id, "b", a)
    return await ctx.step("c", work, ctx.run_id, "c", b)


def make_worker(client: Client) -> Worker:
    # The shipped lease (15 s), not a short one: a leader outage longer than the lease (an
    # election took 5 s on a loaded CI box against a 3 s lease) lets the run's task go to
    # the other worker while its holder still runs it; both then run the step's body, and
    # history's fence records it once. The test's "executed once" holds only for outages
    # shorter than the lease, which is the promise.
    return Worker(client, [chaos_steps], lease_ttl=15.0, max_concurrent_runs=50)
