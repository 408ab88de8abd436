"""Workflows that close in four ways, and an ``on_complete`` hook that counts outside itself.

``report`` appends ``<run_id> <status>`` to the file named by ``NATFLOW_TEST_OUTCOMES`` once
per execution of its step, so a test counts the hook's runs across engine crashes.
"""

from __future__ import annotations

import os

from natflow import RunOutcome, WorkflowContext, workflow

OUTCOMES_ENV = "NATFLOW_TEST_OUTCOMES"


def write_outcome(run_id: str, status: str) -> str:
    with open(os.environ[OUTCOMES_ENV], "a") as out:
        out.write(f"{run_id} {status}\n")
    return status


@workflow(name="report")
async def report(ctx: WorkflowContext, outcome: RunOutcome) -> str:
    return await ctx.step("write", write_outcome, outcome.run_id, outcome.status)


@workflow(name="closing")
async def closing(ctx: WorkflowContext, how: dict[str, object]) -> str:
    """Sleeps, then completes, fails, or waits for a signal (to be cancelled/terminated)."""
    await ctx.sleep("nap", float(how["nap"]))  # type: ignore[arg-type]
    if how["way"] == "fail":
        raise RuntimeError("failed on purpose")
    if how["way"] in ("cancel", "terminate"):
        await ctx.wait_for_signal("never")
    return "done"


@workflow(name="echo_outcome")
async def echo_outcome(ctx: WorkflowContext, outcome: RunOutcome) -> dict[str, object]:
    """Returns what it was told of the closed run (its result or error message)."""
    error = outcome.error.message if outcome.error is not None else None
    return {"status": outcome.status, "result": outcome.result, "error": error}
