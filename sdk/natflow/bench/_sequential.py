"""``natflow bench`` phase 2: one run of N empty steps on a fresh worker process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from natflow_engine import RUN_LEVEL_FILTER, NatflowError
from natflow_engine.events import RunClaimed, RunCompleted, StepCompleted, decode_event, event_kind

from ._procs import WorkerProcesses
from ._report import Raw, Sequential, stats
from ._session import BenchSession
from ._workflows import bench_steps


async def sequential(bench: BenchSession, raw: Raw) -> Sequential:
    n = bench.sizes.steps
    bench.progress.begin(f"sequential run of {n} steps")
    run_id = bench.run_id("seq")
    async with bench.workers("sequential", 1) as procs:
        cpu = bench.cpu(procs)
        starts, done, failed, _ = await _run_many(bench, [run_id], n, procs)
        used = cpu.stop()
        rss = procs.peak_rss()[0]
    if failed or run_id not in done:
        raise NatflowError(f"the sequential run {run_id} did not complete")
    gaps = []
    previous: float | None = None
    for event in await bench.client.history(run_id):
        if isinstance(event, RunClaimed | StepCompleted):
            at = event.at.timestamp()
            if previous is not None and isinstance(event, StepCompleted):
                gaps.append((at - previous) * 1e3)
            previous = at
    step = stats(gaps)
    bench.progress.end(f"step p50 {step.p50:.2f} ms, p99 {step.p99:.2f} ms")
    return Sequential(
        steps=n,
        step_ms=step,
        p50_over_raw_rtt=step.p50 / raw.publish_rtt_ms.p50,
        run_ms=(done[run_id] - starts[run_id]) * 1e3,
        cpu=used,
        worker_peak_rss_mib=rss,
    )


async def _run_many(
    bench: BenchSession, ids: list[str], steps: int, procs: WorkerProcesses
) -> tuple[dict[str, float], dict[str, float], int, float]:
    """Start every run at once and wait for them all to end.

    Returns start times, completion times (the completion event's own timestamp), the
    number of failed runs, and when the last start returned. Ends are seen on one
    subscription to the runs' final events, so the bench client does not receive every
    step event as ``handle.result()`` would.
    """
    wanted = set(ids)
    starts: dict[str, float] = {}
    done: dict[str, float] = {}
    failed: list[str] = []
    finished = asyncio.Event()

    async def on_end(msg: Any) -> None:
        run_id = msg.subject.split(".")[2]
        if run_id not in wanted or event_kind(msg.data) not in ("run_completed", "run_failed"):
            return
        event = decode_event(msg.data)
        if isinstance(event, RunCompleted):
            done[run_id] = event.at.timestamp()
        else:
            failed.append(run_id)
        if len(done) + len(failed) >= len(ids):
            finished.set()

    nc = bench.client.connection.nc
    subs = [await nc.subscribe(RUN_LEVEL_FILTER, cb=on_end)]
    await nc.flush()

    async def start(run_id: str) -> None:
        starts[run_id] = time.time()
        await bench.client.start(bench_steps, steps, run_id=run_id)

    try:
        await asyncio.gather(*(start(r) for r in ids))
        started_all = time.time()
        deadline = time.monotonic() + 60 + len(ids) * steps / 50
        while not finished.is_set() and time.monotonic() < deadline:
            procs.check_alive()
            bench.progress.update(f"{len(done):,}/{len(ids):,} done")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.25)
    finally:
        for sub in subs:
            await sub.unsubscribe()
    return starts, done, len(failed), started_all
