"""``natflow bench`` phases 6 to 8, with a real engine process: timer lateness,
kill-to-restart (SIGKILL a worker mid-step, time until the step restarts elsewhere), and a
schedule firing every second."""

from __future__ import annotations

from ._procs import WorkerProcesses
from ._report import KillRestart, ScheduleFires, Timers
from ._schedules import schedule_lateness
from ._session import BenchSession
from ._waits import engine_process, engine_ready, kill_to_restart, pulls_waiting, timer_lateness


async def waits(bench: BenchSession) -> tuple[Timers, KillRestart, ScheduleFires]:
    sizes, client = bench.sizes, bench.client
    with engine_process(bench.env, bench.dir / "engine.log"):
        await engine_ready(client)
        bench.progress.begin(f"timers: {sizes.timers} sleeps of {sizes.timer_sleep} s")
        async with bench.workers("timers", 1):
            ids = [bench.run_id(f"timer-{i}") for i in range(sizes.timers)]
            timers = await timer_lateness(client, ids, sizes.timer_sleep)
        t = timers.lateness_ms
        bench.progress.end(f"lateness p50 {t.p50:.1f} ms, p99 {t.p99:.1f} ms")
        bench.progress.begin(f"kill to restart, {sizes.kill_rounds} rounds")
        kills = [bench.run_id(f"kill-{i}") for i in range(sizes.kill_rounds)]
        kill = await kill_to_restart(
            client,
            lambda: _one_worker(bench),
            bench.dir / "marks",
            kills,
            lambda n: pulls_waiting(client, n),
        )
        bench.progress.end(f"median {kill.restart_ms.p50:.0f} ms")
        seconds = sizes.schedule_seconds
        bench.progress.begin(f"schedule: every 1 s for {seconds:g} s")
        async with bench.workers("schedule", 1):
            fires, run_ids = await schedule_lateness(client, f"nb-{bench.nonce}-every", seconds)
        bench.run_ids.extend(run_ids)
        f = fires.lateness_ms
        bench.progress.end(f"lateness p50 {f.p50:.1f} ms, p99 {f.p99:.1f} ms")
    return timers, kill, fires


def _one_worker(bench: BenchSession) -> WorkerProcesses:
    """A fresh worker for one kill round, not waited for: the round waits on its pull."""
    n = len(list(bench.dir.glob("worker-kill-*.log")))
    procs = WorkerProcesses(
        1, bench.env, [bench.dir / f"worker-kill-{n}.log"], bench.sizes.concurrency
    )
    procs.start()
    return procs
