"""``natflow bench`` phase 3: M runs of 3 empty steps, started at once by one client, served
by W worker processes beside a real engine process, as deployed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from natflow_engine import DISPATCHER, HISTORY_STREAM, NatflowError, read_varz

from ._procs import CpuWindow, WorkerProcesses
from ._report import Throughput, stats
from ._session import BenchSession
from ._sizes import RUN_STEPS
from ._waits import engine_process, engine_ready
from ._workflows import bench_steps


async def throughput(bench: BenchSession) -> Throughput:
    m, w = bench.sizes.runs, bench.sizes.workers
    bench.progress.begin(
        f"throughput: {m} runs x {RUN_STEPS} steps, {w} worker{'s' if w > 1 else ''}, engine"
    )
    ids = [bench.run_id(f"tp-{i}") for i in range(m)]
    # As deployed: a `natflow engine` process runs beside the workers (dispatcher, run
    # index, timers), and its CPU counts.
    with engine_process(bench.env, bench.dir / "engine-throughput.log") as engine:
        await engine_ready(bench.client)
        async with bench.workers("throughput", w) as procs:
            before = await _history_messages(bench)
            counted = await _server_messages(bench)
            cpu = CpuWindow(procs.pids, bench.server_pid, engine.pid)
            outcome = await _run_observed(bench, ids, procs)
            # The engine's work for these runs counts in full: the window ends once its
            # dispatcher has taken in every event, not when the last result arrived.
            lag = await _engine_caught_up(bench)
            used = cpu.stop()
            rss = procs.peak_rss()
            appended = await _history_messages(bench) - before
            counted_after = await _server_messages(bench)
    starts, done, failed, started_all = outcome
    t0 = min(starts.values())
    wall = max(max(done.values(), default=t0) - t0, 1e-9)
    latencies = [(done[r] - starts[r]) * 1e3 for r in done]
    rate = len(done) / wall
    per_run = used.ms_per(len(done))
    cost = "" if per_run is None else f", {per_run:.2f} ms CPU/run"
    bench.progress.end(f"{rate:,.0f} runs/s, {len(done) * RUN_STEPS / wall:,.0f} steps/s{cost}")
    return Throughput(
        runs=m,
        workers=w,
        completed=len(done),
        failed=failed,
        wall_s=wall,
        runs_per_s=rate,
        steps_per_s=len(done) * RUN_STEPS / wall,
        history_appends_per_s=appended / wall,
        start_rate_per_s=m / max(started_all - t0, 1e-9),
        start_to_result_ms=stats(latencies),
        cpu=used,
        worker_peak_rss_mib=rss,
        engine_lag_s=lag,
        server_msgs_per_run=(
            None
            if counted is None or counted_after is None or not done
            else (counted_after - counted) / len(done)
        ),
    )


async def _run_observed(
    bench: BenchSession, ids: list[str], procs: WorkerProcesses
) -> tuple[dict[str, float], dict[str, float], int, float]:
    """Start every run at once; each ends when its client's ``handle.result()`` returns.

    Returns start times, the times the client saw each result (both this clock), the
    number of failed runs, and when the last start returned.
    """
    starts: dict[str, float] = {}
    started: list[float] = []
    done: dict[str, float] = {}
    failed = 0
    timeout = 60 + len(ids) * RUN_STEPS / 50

    async def one(run_id: str) -> None:
        nonlocal failed
        starts[run_id] = time.perf_counter()
        handle = await bench.client.start(bench_steps, RUN_STEPS, run_id=run_id)
        started.append(time.perf_counter())
        try:
            await handle.result(timeout=timeout)
        except NatflowError:  # a failed or cancelled run: counted, not timed
            failed += 1
            return
        done[run_id] = time.perf_counter()

    async def watch() -> None:
        while True:
            procs.check_alive()
            bench.progress.update(f"{len(done):,}/{len(ids):,} done")
            await asyncio.sleep(0.25)

    watcher: asyncio.Future[Any] = asyncio.ensure_future(watch())
    runs: asyncio.Future[Any] = asyncio.gather(*(one(r) for r in ids))
    try:  # a worker that dies ends the phase at once, with its log
        await asyncio.wait([runs, watcher], return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            runs.cancel()
            watcher.result()
        await runs
    finally:
        watcher.cancel()
        runs.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return starts, done, failed, max(started)


async def _engine_caught_up(bench: BenchSession, timeout: float = 30.0) -> float | None:
    """Seconds until the dispatcher has no event of the history stream left unprocessed
    or unacknowledged (None: not within ``timeout``, or a shared server given by
    ``--url``, whose other traffic may never leave it idle: not waited for there)."""
    if bench.server is None:
        return None
    t0 = time.perf_counter()
    jsm = bench.client.connection.jsm
    while time.perf_counter() - t0 < timeout:
        info = await jsm.consumer_info(HISTORY_STREAM, DISPATCHER)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return time.perf_counter() - t0
        await asyncio.sleep(0.02)
    return None


async def _server_messages(bench: BenchSession) -> int | None:
    """Messages into and out of the server so far (None without its monitoring). Unlike
    time and CPU, their count per run does not depend on what else the machine does."""
    if bench.monitor is None or bench.server is None:  # a shared server's count others too
        return None
    try:
        varz = await read_varz(bench.monitor)
    except NatflowError:
        return None
    return varz.in_msgs + varz.out_msgs


async def _history_messages(bench: BenchSession) -> int:
    """Messages in the history stream (on a shared server, others' appends count too)."""
    info = await bench.client.connection.jsm.stream_info(HISTORY_STREAM)
    return int(info.state.messages)
