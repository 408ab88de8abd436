"""I/O, threads and processes in workflow code (not in a step) fail the run with NotDurable,
naming the loop call and the fix, as asyncio.sleep does; never a bare NotImplementedError."""

from __future__ import annotations

import asyncio
import sys

import pytest
from natflow import Client, RunFailed, Workflow, WorkflowContext, workflow

from tests.helpers import running_worker


def work() -> int:
    return 1


@workflow
async def io_connect(ctx: WorkflowContext, input: None) -> None:
    await asyncio.open_connection("127.0.0.1", 9)


@workflow
async def io_to_thread(ctx: WorkflowContext, input: None) -> int:
    return await asyncio.to_thread(work)


@workflow
async def io_dns(ctx: WorkflowContext, input: None) -> object:
    return await asyncio.get_running_loop().getaddrinfo("localhost", 80)


@workflow
async def io_process(ctx: WorkflowContext, input: None) -> None:
    await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")


# Each workflow and the loop call its I/O reaches.
FLOWS: dict[str, Workflow] = {
    "create_connection": io_connect,
    "run_in_executor": io_to_thread,
    "getaddrinfo": io_dns,
    "subprocess_exec": io_process,
}


@pytest.mark.anyio
@pytest.mark.parametrize("call", sorted(FLOWS))
async def test_io_in_workflow_code_fails_the_run_naming_the_fix(client: Client, call: str) -> None:
    async with running_worker(client, list(FLOWS.values())):
        handle = await client.start(FLOWS[call], run_id=f"io-{call.replace('_', '-')}")
        with pytest.raises(RunFailed) as caught:
            await handle.result(timeout=15)
    assert caught.value.error.type == "NotDurable"
    assert caught.value.error.message == (
        f"workflow code cannot do I/O or start threads or processes (loop.{call}): "
        "put it in a ctx.step"
    )
