"""``natflow bench`` phase 4: one-step runs, one at a time, on an otherwise idle system."""

from __future__ import annotations

import asyncio
import time

from natflow_engine.events import StepCompleted

from ._report import StartLatency, stats
from ._session import BenchSession
from ._sizes import IDLE_GAP
from ._workflows import bench_steps


async def start_latency(bench: BenchSession) -> StartLatency:
    k = bench.sizes.idle_samples
    bench.progress.begin(f"idle start latency, {k} runs one at a time")
    begun: dict[str, float] = {}
    calls: list[float] = []
    results: list[float] = []
    async with bench.workers("idle", 1) as procs:
        for i in range(k):
            await asyncio.sleep(IDLE_GAP)  # let the system go idle again
            bench.progress.update(f"{i}/{k}")
            run_id = bench.run_id(f"idle-{i}")
            t0 = time.time()
            handle = await bench.client.start(bench_steps, 1, run_id=run_id)
            calls.append((time.time() - t0) * 1e3)
            await handle.result(timeout=30)
            results.append((time.time() - t0) * 1e3)
            begun[run_id] = t0
        rss = procs.peak_rss()[0]
    first_steps = []
    for run_id, t0 in begun.items():
        for event in await bench.client.history(run_id):
            if isinstance(event, StepCompleted):
                first_steps.append((event.started_at.timestamp() - t0) * 1e3)
                break
    first = stats(first_steps)
    bench.progress.end(f"start to first step p50 {first.p50:.2f} ms")
    return StartLatency(
        samples=k,
        start_to_first_step_ms=first,
        start_to_result_ms=stats(results),
        start_call_ms=stats(calls),
        worker_peak_rss_mib=rss,
    )
