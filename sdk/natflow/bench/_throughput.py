"""``natflow bench`` phase 3: M runs of 3 empty steps, started at once by one client (or
split among C client processes), served by W worker processes beside E real engine
processes, as deployed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from natflow_engine import DISPATCHERS, HISTORY_STREAM, NatflowError, read_varz

from ._client_run import ClientTimes, run_share
from ._clients import ClientProcesses, client_processes
from ._procs import CpuWindow, WorkerProcesses
from ._report import Cpu, Throughput, stats
from ._session import BenchSession
from ._sizes import RUN_STEPS
from ._waits import engine_processes, engine_ready

T = TypeVar("T")


async def throughput(bench: BenchSession, workers: int | None = None) -> Throughput:
    """The phase with ``workers`` worker processes (default: the bench's ``--workers``)."""
    m, w = bench.sizes.runs, workers or bench.sizes.workers
    c, e = bench.sizes.clients, bench.sizes.engines
    bench.progress.begin(
        f"throughput: {m} runs x {RUN_STEPS} steps, {_count(w, 'worker')}, "
        f"{_count(c, 'client')}, {_count(e, 'engine')}"
    )
    phase = bench.phase_name(f"throughput-{w}")  # unique, as is each run id below
    ids = [bench.run_id(f"tp-{phase}-{i}") for i in range(m)]
    timeout = 60 + m * RUN_STEPS / 50
    # As deployed: `natflow engine` processes run beside the workers (dispatcher, run
    # index, timers), and their CPU counts.
    engine_logs = [bench.dir / f"engine-{phase}-{i}.log" for i in range(e)]
    with engine_processes(bench.env, engine_logs) as engines:
        await engine_ready(bench.client, replicas=e)
        async with bench.workers(phase, w) as procs:
            before = await _history_messages(bench)
            counted = await _server_messages(bench)
            engine_pids = [p.pid for p in engines]
            if c == 1:
                cpu = CpuWindow(procs.pids, bench.server_pid, engine_pids)
                times = await _run_here(bench, ids, timeout, procs.check_alive)
                running = cpu.stop()
                lag, used = await _caught_up(bench, cpu)
            else:
                logs = [bench.dir / f"client-{w}-{i}.log" for i in range(c)]
                async with client_processes(bench.env, logs, ids, timeout) as clients:
                    cpu = CpuWindow(procs.pids, bench.server_pid, engine_pids, clients.pids)
                    times = await _run_in_clients(bench, clients, procs)
                    running = cpu.stop()
                    # before the clients exit: their CPU is read from /proc
                    lag, used = await _caught_up(bench, cpu)
            rss = procs.peak_rss()
            appended = await _history_messages(bench) - before
            counted_after = await _server_messages(bench)
    done = times.done
    t0 = min(times.starts.values())
    wall = max(max(done.values(), default=t0) - t0, 1e-9)
    latencies = [(done[r] - times.starts[r]) * 1e3 for r in done]
    rate = len(done) / wall
    per_run = used.ms_per(len(done))
    cost = "" if per_run is None else f", {per_run:.2f} ms CPU/run"
    bench.progress.end(f"{rate:,.0f} runs/s, {len(done) * RUN_STEPS / wall:,.0f} steps/s{cost}")
    return Throughput(
        runs=m,
        workers=w,
        clients=c,
        engines=e,
        completed=len(done),
        failed=times.failed,
        wall_s=wall,
        runs_per_s=rate,
        steps_per_s=len(done) * RUN_STEPS / wall,
        history_appends_per_s=appended / wall,
        start_rate_per_s=m / max(times.started_all - t0, 1e-9),
        start_to_result_ms=stats(latencies),
        cpu=used,
        cpu_running=running,
        worker_peak_rss_mib=rss,
        engine_lag_s=lag,
        server_msgs_per_run=(
            None
            if counted is None or counted_after is None or not done
            else (counted_after - counted) / len(done)
        ),
    )


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n > 1 else ''}"


async def _caught_up(bench: BenchSession, cpu: CpuWindow) -> tuple[float | None, Cpu]:
    """The engine's work for the runs counts in full: the window ends once its dispatcher
    has taken in every event, not when the last result arrived."""
    lag = await _engine_caught_up(bench)
    return lag, cpu.stop()


async def _run_here(
    bench: BenchSession, ids: list[str], timeout: float, alive: Callable[[], None]
) -> ClientTimes:
    """Every run started and awaited by this process's client."""
    times = ClientTimes()
    await _watched(bench, run_share(bench.client, ids, timeout, times), alive, times)
    return times


async def _run_in_clients(
    bench: BenchSession, clients: ClientProcesses, procs: WorkerProcesses
) -> ClientTimes:
    """Every run started and awaited by the client processes, each its share."""
    await clients.go()

    def alive() -> None:
        procs.check_alive()
        clients.check_alive()

    return _merged(await _watched(bench, clients.results(), alive, None))


async def _watched(
    bench: BenchSession,
    work: Awaitable[T],
    alive: Callable[[], None],
    times: ClientTimes | None,
) -> T:
    """``work``, ended at once with the log of a worker or client process that dies."""

    async def watch() -> None:
        while True:
            alive()
            if times is not None:
                bench.progress.update(f"{len(times.done):,} done")
            await anyio.sleep(0.25)

    result: list[T] = []

    async def main(scope: anyio.CancelScope) -> None:
        result.append(await work)
        scope.cancel()  # the watcher with it

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)  # a process that dies ends the phase at once, with its log
            tg.start_soon(main, tg.cancel_scope)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # the bench reports the error, not the group
            raise group.exceptions[0] from None
        raise
    return result[0]


def _merged(parts: list[ClientTimes]) -> ClientTimes:
    merged = ClientTimes()
    for part in parts:
        merged.starts.update(part.starts)
        merged.done.update(part.done)
        merged.failed += part.failed
        merged.started_all = max(merged.started_all, part.started_all)
    return merged


async def _engine_caught_up(bench: BenchSession, timeout: float = 30.0) -> float | None:
    """Seconds until the dispatcher has no event of the history stream left unprocessed
    or unacknowledged (None: not within ``timeout``, or a shared server given by
    ``--url``, whose other traffic may never leave it idle: not waited for there)."""
    if bench.server is None:
        return None
    t0 = time.perf_counter()
    jsm = bench.client.connection.jsm
    while time.perf_counter() - t0 < timeout:
        infos = [await jsm.consumer_info(HISTORY_STREAM, name) for name in DISPATCHERS]
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
            return time.perf_counter() - t0
        await anyio.sleep(0.02)
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
