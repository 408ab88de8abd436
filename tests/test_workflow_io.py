"""I/O, threads and processes in workflow code (not in a step) fail the run with NotDurable,
naming the loop call and the fix, as asyncio.sleep does; never a bare NotImplementedError."""

from __future__ import annotations

import asyncio
import sys

import pytest
from natflow import Client, RunFailed, Workflow, WorkflowContext, workflow

from tests.helpers import replay_recorded, running_worker


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


def double(x: int) -> int:
    return x * 2


@workflow
async def anyio_branches(ctx: WorkflowContext, input: None) -> dict[str, int]:
    import anyio

    out: dict[str, int] = {}

    async def branch(name: str, x: int) -> None:
        out[name] = await ctx.step(name, double, x)

    async with anyio.create_task_group() as tg:
        tg.start_soon(branch, "x", 1)
        tg.start_soon(branch, "y", 2)
    return out


@pytest.mark.anyio
async def test_an_anyio_task_group_in_workflow_code_runs_its_steps(client: Client) -> None:
    """anyio asks the loop for its task factory: refused, the run failed with an
    ExceptionGroup that hid why."""
    async with running_worker(client, [anyio_branches]):
        handle = await client.start(anyio_branches, None, run_id="anyio-tg")
        assert await handle.result(timeout=10) == {"x": 2, "y": 4}
    replayed = await replay_recorded(client, anyio_branches, "anyio-tg")
    assert replayed.divergence is None and replayed.result == {"x": 2, "y": 4}


@workflow
async def parallel_of_a_list(ctx: WorkflowContext, input: None) -> object:
    return await ctx.parallel([ctx.step("a", work), ctx.step("b", work)])  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_list_given_to_ctx_parallel_is_named_with_the_fix(client: Client) -> None:
    """It failed the run with "TypeError: unhashable type: 'list'"."""
    async with running_worker(client, [parallel_of_a_list]):
        handle = await client.start(parallel_of_a_list, None, run_id="par-list")
        with pytest.raises(RunFailed) as failed:
            await handle.result(timeout=10)
    assert failed.value.error.type == "InvalidInput"
    assert "ctx.parallel(*items)" in failed.value.error.message
