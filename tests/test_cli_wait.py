"""`natflow runs wait` and `natflow start --wait` on a long run: each look describes the
run (a read of its whole history), so the command looks at run-level events, or once for
the events heard meanwhile, never once per step of a run of many steps."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from natflow import Client, WorkflowContext, workflow
from natflow_engine import Runs, ensure_streams
from natflow_engine._cli_runs import _wait_and_show

from tests.helpers import running_worker

STEPS = 120


def _same(value: int) -> int:
    return value


@workflow(name="long_walk")
async def long_walk(ctx: WorkflowContext, n: int) -> int:
    for i in range(n):
        await ctx.step("walk", _same, i)
    return n


class _CountingRuns(Runs):
    """The command's run reader, counting its looks."""

    def __init__(self, client: Client) -> None:
        super().__init__(client.connection)
        self.looks = 0

    async def describe(self, run_id: str, *, explain: bool = True) -> Any:
        self.looks += 1
        return await super().describe(run_id, explain=explain)


@pytest.mark.anyio
@pytest.mark.parametrize("progress", [False, True])
async def test_waiting_on_a_long_run_does_not_read_its_history_for_every_step(
    client: Client, progress: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    await ensure_streams(client.connection)
    runs = _CountingRuns(client)
    run_id = f"long-walk-{progress}"
    async with running_worker(client, [long_walk]):
        await client.start(long_walk, STEPS, run_id=run_id)
        with anyio.fail_after(30):
            code = await _wait_and_show(
                client.connection, runs, run_id, as_json=True, progress=progress
            )
    assert code == 0
    assert '"completed"' in capsys.readouterr().out
    # Without progress: the start, the claim, the end, a look each at most, and the first.
    # With it, a look for the step events heard meanwhile: how many depends on the machine.
    if not progress:
        assert runs.looks <= 4, runs.looks
