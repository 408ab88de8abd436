"""``natflow bench`` phase: one long loop through continue-as-new, and a kill in the middle.

1. One run of ``loop_steps`` empty steps (``natflow-bench-loop``), which continues as new
   whenever ``ctx.continue_as_new_suggested`` says so: wall time and stretches.
2. A second run of ``loop_kill_steps`` whose worker is SIGKILLed at a random point: a fresh
   process then reads and rebuilds the run as the next worker must (the same probe as the
   replay phase, so the figure sits beside the 10,000-event one), and a new worker finishes
   the run (its result is checked).

Both with a real engine process beside the workers, as deployed (its reaper hands the killed
worker's run on).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

from natflow_engine import NatflowError, history_subject
from natflow_engine.events import event_kind
from nats.aio.msg import Msg

from ._replay import replay_probe
from ._report import ContinueLoop, stats
from ._session import BenchSession
from ._waits import engine_process, engine_ready
from ._workflows import LoopInput, ReplayTimes, bench_loop


async def continue_loop(bench: BenchSession) -> ContinueLoop:
    client = bench.client
    steps, kill_steps = bench.sizes.loop_steps, bench.sizes.loop_kill_steps
    bench.progress.begin(f"continue-as-new: a loop of {steps:,} steps, a kill mid-loop")
    with engine_process(bench.env, bench.dir / "engine-loop.log"):
        await engine_ready(client)
        async with bench.workers("loop", 1):
            run_id = bench.run_id("loop")
            t0 = time.perf_counter()
            handle = await client.start(bench_loop, LoopInput(total=steps), run_id=run_id)
            done = await handle.result(timeout=max(600.0, steps / 50))
            wall = time.perf_counter() - t0
            if done != steps:
                raise NatflowError(f"the loop returned {done}, not {steps}")
            stretches = (await client.describe(run_id)).stretch
        bench.progress.update("killing a worker mid-loop")
        replay, at_kill = await _killed_mid_loop(bench, kill_steps)
    warm = replay.read_ms[1:] or replay.read_ms
    warm_rebuild = replay.rebuild_ms[1:] or replay.rebuild_ms
    totals = [a + b for a, b in zip(warm, warm_rebuild, strict=True)]
    found = ContinueLoop(
        steps=steps,
        wall_s=wall,
        steps_per_s=steps / wall,
        stretches=stretches,
        kill_steps=kill_steps,
        killed_at_stretch=at_kill[0],
        stretch_events_at_kill=replay.events,
        replay_read_ms=stats(warm).p50,
        replay_rebuild_ms=stats(warm_rebuild).p50,
        replay_ms=stats(totals).p50,
        replay_cold_ms=replay.read_ms[0] + replay.rebuild_ms[0],
        resumed_s=at_kill[1],
    )
    bench.progress.end(
        f"{steps:,} steps in {wall:.1f} s over {stretches} stretches; replay after a kill "
        f"{found.replay_ms:.1f} ms ({replay.events:,} events)"
    )
    return found


async def _killed_mid_loop(
    bench: BenchSession, steps: int
) -> tuple[ReplayTimes, tuple[int, float]]:
    """Kill the loop's only worker at a random point; probe the replay; finish the run."""
    client = bench.client
    run_id = bench.run_id("loop-kill")
    # A random point between a fifth and four fifths of the way, counted in steps the run
    # records (not guessed from a pace: a warm second loop outran the first's).
    target = max(1, int(random.uniform(0.2, 0.8) * steps))
    recorded = 0
    reached = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        nonlocal recorded
        if event_kind(msg.data) == "step_completed":
            recorded += 1
            if recorded >= target:
                reached.set()

    sub = await client.connection.nc.subscribe(history_subject(run_id), cb=on_event)
    try:
        async with bench.workers("loop-kill", 1) as procs:
            handle = await client.start(bench_loop, LoopInput(total=steps), run_id=run_id)
            await asyncio.wait_for(reached.wait(), timeout=max(600.0, steps / 50))
            for pid in procs.pids:
                os.kill(pid, signal.SIGKILL)
            for proc in procs.procs:
                proc.wait()
    finally:
        await sub.unsubscribe()
    info = await client.describe(run_id)
    if info.is_closed:
        raise NatflowError("the loop ended before its worker was killed; raise loop_kill_steps")
    times = await replay_probe(bench, run_id, bench_loop.name)
    t0 = time.perf_counter()
    async with bench.workers("loop-resume", 1):
        done = await handle.result(timeout=max(600.0, steps / 50))
    if done != steps:
        raise NatflowError(f"the killed loop returned {done}, not {steps}")
    return times, (info.stretch, time.perf_counter() - t0)
