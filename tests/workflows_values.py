"""Workflows with large values, for the value-store tests (in-process and worker processes).

Run as ``natflow worker tests.workflows_values:make_worker``. The ``blob`` step returns
``NATFLOW_TEST_BLOB_MB`` MiB (default 50) of deterministic text and appends a line to the file
named by ``NATFLOW_TEST_COUNTS`` each time its body runs.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from natflow import Client, RetryPolicy, Worker, WorkflowContext, workflow

BLOB_ENV = "NATFLOW_TEST_BLOB_MB"
COUNTS_ENV = "NATFLOW_TEST_COUNTS"
LEASE_TTL = 2.0


def blob(size: int, seed: str) -> str:
    """``size`` characters of text that differ along their length (not one repeated byte)."""
    unit = "".join(hashlib.sha256(f"{seed}{i}".encode()).hexdigest() for i in range(64))
    return (unit * (size // len(unit) + 1))[:size]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def make_blob(megabytes: float) -> str:
    counts = os.environ.get(COUNTS_ENV)
    if counts:
        with open(counts, "a") as out:  # noqa: ASYNC230 - one short line
            out.write("blob\n")
    return blob(int(megabytes * 1024 * 1024), "step")


@workflow(name="big_values")
async def big_values(ctx: WorkflowContext, data: str) -> dict[str, Any]:
    megabytes = float(os.environ.get(BLOB_ENV, "50"))
    made = await ctx.step("blob", make_blob, megabytes)
    more = await ctx.wait_for_signal("more")
    return {
        "input": [len(data), digest(data)],
        "blob": [len(made), digest(made)],
        "signal": [len(more), digest(more)],
        "echo": more,
    }


@workflow(name="too_big_step")
async def too_big_step(ctx: WorkflowContext, megabytes: float) -> str:
    made = await ctx.step("huge", make_blob, megabytes, retry=RetryPolicy(max_attempts=1))
    return made[:10]


WORKFLOWS = [big_values, too_big_step]


def make_worker(client: Client) -> Worker:
    return Worker(client, WORKFLOWS, lease_ttl=LEASE_TTL)
