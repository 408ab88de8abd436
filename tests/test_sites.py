"""Sites (ops/sites): runs homed at a site keep going while its link to the hub is cut."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest
from natflow import Client, Worker, WorkflowContext, workflow
from natflow_engine._connection import NoResponders, RequestTimeout
from natflow_engine._engine import Engine

from tests.helpers import wait_for
from tests.sites import Sites, linked, started_sites

BODIES: Counter[str] = Counter()


async def body(run_id: str, step: str, value: int) -> int:
    BODIES[f"{run_id}:{step}"] += 1
    await anyio.sleep(0.05)
    return value + 1


@workflow(name="site_flow")
async def site_flow(ctx: WorkflowContext, x: int) -> int:
    v = await ctx.step("s1", body, ctx.run_id, "s1", x)
    v = await ctx.step("s2", body, ctx.run_id, "s2", v)
    await ctx.sleep("nap", 0.3)
    v = await ctx.step("s3", body, ctx.run_id, "s3", v)
    extra = await ctx.wait_for_signal("go", timeout=120)
    v = await ctx.step("s4", body, ctx.run_id, "s4", v + extra)
    return await ctx.step("s5", body, ctx.run_id, "s5", v)


async def hub_unreachable(client: Client) -> bool:
    try:
        await client.connection.request("$JS.hub.API.INFO", b"", timeout=0.5)
    except (NoResponders, RequestTimeout):
        return True
    return False


@pytest.mark.slow
async def test_runs_homed_at_a_site_run_through_a_cut(tmp_path: Path) -> None:
    BODIES.clear()
    with started_sites(tmp_path) as sites:
        await run_through_a_cut(sites, runs=10, late_runs=2)


async def run_through_a_cut(sites: Sites, *, runs: int, late_runs: int) -> None:
    hub = await Client.connect(sites.hub.url)
    berlin = await Client.connect(sites.berlin.url)  # no domain: the site's own JetStream
    try:
        await linked(berlin, "hub")
        async with anyio.create_task_group() as tg:
            for conn in (hub.connection, berlin.connection):
                engine = Engine(conn)
                tg.start_soon(engine.run)
                await engine.ready.wait()
            async with Worker(berlin, [site_flow]):
                ids = [f"b-{i}" for i in range(runs)]
                for i, run_id in enumerate(ids):
                    await berlin.start(site_flow, i, run_id=run_id)

                async def some_steps_ran() -> bool:
                    return sum(BODIES.values()) >= runs

                await wait_for(some_steps_ran, timeout=30, what="the first steps")
                sites.link.cut()
                assert await hub_unreachable(berlin)
                at_cut = sum(BODIES.values())
                # During the cut: new runs start, steps run, sleeps fire, signals arrive.
                late = [f"b-late-{i}" for i in range(late_runs)]
                for run_id in late:
                    await berlin.start(site_flow, 100, run_id=run_id)
                for run_id in ids + late:

                    async def waiting(run_id: str = run_id) -> bool:
                        return (await berlin.describe(run_id)).status == "waiting"

                    await wait_for(waiting, timeout=60, what=f"{run_id} to wait for its signal")
                    await berlin.signal(run_id, "go", 1000)
                for run_id in ids + late:
                    assert await berlin.handle(run_id).result(timeout=60) > 1000
                assert await hub_unreachable(berlin)  # all of it happened during the cut
                assert sum(BODIES.values()) > at_cut
                sites.link.up()
                await linked(berlin, "hub")
            tg.cancel_scope.cancel()
        for run_id in ids + late:
            history = await berlin.history(run_id)
            steps = [e.name for e in history if e.__struct_config__.tag == "step_completed"]  # type: ignore[attr-defined]
            assert steps == ["s1", "s2", "s3", "s4", "s5"], run_id
        assert set(BODIES.values()) == {1}, BODIES
        # The site's runs live at the site only: the hub's history holds none of them.
        info = await hub.connection.jsm.stream_info("NATFLOW_HISTORY")
        assert info.state.messages == 0
    finally:
        await berlin.close()
        await hub.close()
