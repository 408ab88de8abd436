"""``natflow bench`` phase 4: one-step runs, one at a time, on an otherwise idle system.

Runs alternate between a run id the bench chooses (its start is appended, then its task
written naming the start's sequence) and none (``client.start`` makes the id, and writes the
start and its task at once): the two paths ``start()`` takes."""

from __future__ import annotations

import asyncio
import time

from natflow_engine.events import StepCompleted

from .._handle import RunHandle
from ._report import StartLatency, Stats, stats
from ._session import BenchSession
from ._sizes import IDLE_GAP
from ._workflows import bench_steps


async def start_latency(bench: BenchSession) -> StartLatency:
    k = bench.sizes.idle_samples
    bench.progress.begin(f"idle start latency, {k} + {k} runs one at a time")
    begun: dict[bool, dict[str, float]] = {True: {}, False: {}}
    calls: dict[bool, list[float]] = {True: [], False: []}
    results: list[float] = []
    async with bench.workers("idle", 1) as procs:
        for i in range(k):
            for chosen in (True, False):
                await asyncio.sleep(IDLE_GAP)  # let the system go idle again
                bench.progress.update(f"{i}/{k}")
                t0 = time.time()
                handle: RunHandle
                if chosen:
                    run_id = bench.run_id(f"idle-{i}")
                    handle = await bench.client.start(bench_steps, 1, run_id=run_id)
                else:
                    handle = await bench.client.start(bench_steps, 1)
                    bench.run_ids.append(handle.run_id)  # removed with the bench's own
                calls[chosen].append((time.time() - t0) * 1e3)
                await handle.result(timeout=30)
                if chosen:
                    results.append((time.time() - t0) * 1e3)
                begun[chosen][handle.run_id] = t0
        rss = procs.peak_rss()[0]
    first = await _first_steps(bench, begun[True])
    fresh = await _first_steps(bench, begun[False])
    bench.progress.end(f"start to first step p50 {first.p50:.2f} ms (fresh id {fresh.p50:.2f} ms)")
    return StartLatency(
        samples=k,
        start_to_first_step_ms=first,
        start_to_result_ms=stats(results),
        start_call_ms=stats(calls[True]),
        fresh_start_to_first_step_ms=fresh,
        fresh_start_call_ms=stats(calls[False]),
        worker_peak_rss_mib=rss,
    )


async def _first_steps(bench: BenchSession, begun: dict[str, float]) -> Stats:
    """From each start's call to its first step's start, as the step's event records it."""
    first_steps = []
    for run_id, t0 in begun.items():
        for event in await bench.client.history(run_id):
            if isinstance(event, StepCompleted):
                first_steps.append((event.started_at.timestamp() - t0) * 1e3)
                break
    return stats(first_steps)
