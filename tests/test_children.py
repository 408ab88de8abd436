"""Child runs: started once, outcomes recorded in the parent once, parent_close policies."""

from __future__ import annotations

from collections import Counter

import pytest
from natflow import Client, RunCancelled
from natflow_engine._engine import Engine

from tests.helpers import running_worker, wait_for
from tests.workflows_children import WORKFLOWS, family, grandparent, kid


def kinds(events: list[object]) -> list[str]:
    return [e.__struct_config__.tag for e in events]  # type: ignore[attr-defined]


async def status_of(client: Client, run_id: str) -> str:
    return (await client.describe(run_id)).status


async def test_a_parent_gets_each_childs_outcome_once(client: Client, engine: Engine) -> None:
    async with (
        running_worker(client, WORKFLOWS),
        running_worker(client, [kid], queue="other"),
    ):
        handle = await client.start(family, 4, run_id="fam-1")

        async def napping() -> bool:
            try:
                return await status_of(client, "fam-1-c4") == "sleeping"
            except Exception:
                return False

        await wait_for(napping, what="the napping child to sleep")
        await client.cancel("fam-1-c4", reason="not needed")
        result = await handle.result(timeout=20)
    assert result == [40, 50, "failed: StepError", "cancelled", 90]
    history = await client.history("fam-1")
    counted = Counter(kinds(history))
    assert counted["child_started"] == 4
    assert counted["child_completed"] == 2 and counted["child_failed"] == 2
    started = [e for e in history if e.__struct_config__.tag == "child_started"]
    assert [e.child_run_id for e in started] == [f"fam-1-c{i}" for i in range(1, 5)]  # type: ignore[attr-defined]
    other = await client.describe("fam-1-c2")
    assert other.queue == "other" and other.parent == "fam-1"
    for i in range(1, 5):
        assert (await client.describe(f"fam-1-c{i}")).parent == "fam-1"


async def test_cancelling_a_parent_cancels_its_children_and_theirs(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(grandparent, run_id="gp-1")

        async def grandchild_sleeps() -> bool:
            try:
                return await status_of(client, "gp-1-c1-c1") == "sleeping"
            except Exception:
                return False

        await wait_for(grandchild_sleeps, what="the grandchild to sleep")
        await client.cancel("gp-1", reason="stop all")
        with pytest.raises(RunCancelled):
            await handle.result(timeout=10)

        async def all_cancelled() -> bool:
            return all(
                [await status_of(client, r) == "cancelled" for r in ("gp-1-c1", "gp-1-c1-c1")]
            )

        await wait_for(all_cancelled, timeout=15, what="child and grandchild cancelled")
