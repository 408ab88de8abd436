"""The full-size site trial of issue 17, as a script (too long for the test suite):

    .venv/bin/python -m tests.site_cut_trial --runs 100 --steps 5 --cut 30

Starts ops/sites on loopback (hub, berlin, paris; a proxy between berlin and the hub), an
engine at the hub (--sites) and at berlin (--site), a worker at berlin; starts the runs at
berlin, cuts the link for ``--cut`` seconds while their steps run, and reports: steps run
during the cut, runs completed, steps recorded per run, bodies run more than once, and how
long after the link returned the hub's list showed every run's final status.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import anyio
from natflow import Client, Worker, WorkflowContext, workflow
from natflow_engine._connection import NatflowError
from natflow_engine._engine import Engine

from tests.helpers import wait_for
from tests.sites import linked, started_sites

BODIES: Counter[str] = Counter()
DONE_AT: list[float] = []
STEP_SECONDS = [1.0]


async def step(run_id: str, n: int, value: int) -> int:
    BODIES[f"{run_id}:{n}"] += 1
    await anyio.sleep(STEP_SECONDS[0])
    DONE_AT.append(time.monotonic())
    return value + 1


def make_flow(steps: int) -> object:
    @workflow(name="trial_flow")
    async def trial_flow(ctx: WorkflowContext, x: int) -> int:
        for n in range(steps):
            x = await ctx.step(f"s{n}", step, ctx.run_id, n, x)
        return x

    return trial_flow


async def hub_unreachable(client: Client) -> bool:
    try:
        await client.connection.request("$JS.hub.API.INFO", b"", timeout=0.5)
    except NatflowError:
        return True
    return False


async def trial(runs: int, steps: int, cut: float) -> dict[str, object]:
    # Steps long enough that every run is mid-flight when the cut starts, short enough that
    # all finish during it: the hub's view is stale when the link returns.
    STEP_SECONDS[0] = min(4.0, max(0.2, (cut - 5) / steps))
    flow = make_flow(steps)
    with tempfile.TemporaryDirectory() as tmp, started_sites(Path(tmp)) as sites:
        hub = await Client.connect(sites.hub.url)
        berlin = await Client.connect(sites.berlin.url)
        await linked(berlin, "hub")
        async with anyio.create_task_group() as tg:
            for engine in (
                Engine(hub.connection, sites=["berlin", "paris"]),
                Engine(berlin.connection, site="berlin"),
            ):
                tg.start_soon(engine.run)
                await engine.ready.wait()
            async with Worker(berlin, [flow], max_concurrent_runs=runs):  # type: ignore[list-item]
                ids = [f"trial-{i}" for i in range(runs)]
                for i, run_id in enumerate(ids):
                    await berlin.start(flow, i, run_id=run_id)  # type: ignore[arg-type]

                async def all_started() -> bool:
                    return len({k.split(":")[0] for k in BODIES}) == runs

                await wait_for(all_started, timeout=60, what="every run's first step")
                sites.link.cut()
                cut_at = time.monotonic()
                assert await hub_unreachable(berlin)
                results = {}
                for run_id in ids:
                    results[run_id] = await berlin.handle(run_id).result(timeout=cut + 60)
                completed_in_cut = time.monotonic() - cut_at < cut
                await anyio.sleep(max(0.0, cut - (time.monotonic() - cut_at)))
                steps_in_cut = sum(1 for t in DONE_AT if cut_at <= t <= time.monotonic())
                hub_before = Counter(r.status for r in await hub.list(limit=10 * runs))
                sites.link.up()
                up_at = time.monotonic()
                await linked(berlin, "hub", timeout=60)
                linked_at = time.monotonic()

                async def hub_sees_all() -> bool:
                    listed = {r.run_id: r for r in await hub.list(limit=10 * runs)}
                    return all(
                        run_id in listed and listed[run_id].status == "completed" for run_id in ids
                    )

                await wait_for(hub_sees_all, timeout=120, what="the hub's list")
                seen_at = time.monotonic()
            tg.cancel_scope.cancel()
        recorded = Counter()
        for run_id in ids:
            history = await berlin.history(run_id)
            recorded[
                sum(1 for e in history if e.__struct_config__.tag == "step_completed")  # type: ignore[attr-defined]
            ] += 1
        await berlin.close()
        await hub.close()
    return {
        "runs": runs,
        "steps_per_run": steps,
        "cut_s": cut,
        "step_body_s": STEP_SECONDS[0],
        "all_completed_during_cut": completed_in_cut,
        "results_ok": all(results[f"trial-{i}"] == i + steps for i in range(runs)),
        "step_completions_during_cut": steps_in_cut,
        "runs_by_steps_recorded": dict(recorded),
        "bodies_run_twice": sum(1 for v in BODIES.values() if v > 1),
        "hub_statuses_before_link_returned": dict(hub_before),
        "leaf_relinked_after_proxy_restart_s": round(linked_at - up_at, 2),
        "hub_list_final_after_relink_s": round(seen_at - linked_at, 2),
        "hub_list_final_after_proxy_restart_s": round(seen_at - up_at, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cut", type=float, default=30.0)
    args = parser.parse_args()
    print(json.dumps(anyio.run(trial, args.runs, args.steps, args.cut), indent=2))


if __name__ == "__main__":
    main()
