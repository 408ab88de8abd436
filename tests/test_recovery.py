"""Leases, heartbeats and crash recovery with real worker processes and real signals."""

from __future__ import annotations

import contextlib
import random
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from natflow import Client
from natflow_engine._engine import Engine
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer

from tests.helpers import spawn_engine, spawn_worker, stop, wait_for

TARGET = "tests.workflows_recovery:make_worker"


class StepLog:
    """Reads the lines the step bodies write: ``<event> <run> <step> <pid> <time>``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[tuple[str, str, str, int, float]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            event, run, step, pid, at = line.split()
            rows.append((event, run, step, int(pid), float(at)))
        return rows

    def starts(self, run: str, step: str) -> list[tuple[int, float]]:
        return [(r[3], r[4]) for r in self.rows() if r[:3] == ("start", run, step)]

    def executions(self) -> Counter[tuple[str, str]]:
        return Counter((r[1], r[2]) for r in self.rows() if r[0] == "start")


class Workers:
    """Worker processes for one test; all are stopped at the end."""

    def __init__(self, url: str, tmp: Path, env: dict[str, str]) -> None:
        self.url, self.tmp, self.env = url, tmp, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = self.tmp / f"worker-{len(self.procs)}.log"
        proc = spawn_worker(self.url, TARGET, env=self.env, log=log)
        proc.log = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def by_pid(self, pid: int) -> subprocess.Popen[bytes]:
        return next(p for p in self.procs if p.pid == pid)

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                stop(proc, signal.SIGTERM)


@pytest.fixture
def steps(tmp_path: Path) -> StepLog:
    return StepLog(tmp_path / "steps.log")


@pytest.fixture
def make_workers(
    nats_server: EmbeddedServer, tmp_path: Path, steps: StepLog
) -> Iterator[Callable[[float], Workers]]:
    made: list[Workers] = []

    def make(lease: float = 15.0) -> Workers:
        env = {"NATFLOW_TEST_LOG": str(steps.path), "NATFLOW_TEST_LEASE": str(lease)}
        workers = Workers(nats_server.url, tmp_path, env)
        made.append(workers)
        return workers

    yield make
    for workers in made:
        workers.stop_all()


async def registered(client: Client, count: int) -> None:
    async def enough() -> bool:
        return len(await list_workers(client.connection)) >= count

    await wait_for(enough, timeout=20, what=f"{count} registered workers")


async def one_completion_per_step(client: Client, run_id: str) -> None:
    history = await client.history(run_id)
    done = Counter(
        e.seq for e in history if e.__struct_config__.tag in ("step_completed", "step_failed")
    )
    assert done and set(done.values()) == {1}, f"{run_id}: {done}"


async def test_sigkill_mid_step_resumes_elsewhere_within_a_second(
    client: Client, engine: Engine, make_workers: Callable[[float], Workers], steps: StepLog
) -> None:
    workers = make_workers(15.0)  # a long lease: recovery must not wait for it
    workers.start()
    workers.start()
    await registered(client, 2)
    delays = []
    for round_ in range(5):
        run_id = f"kill-{round_}"
        handle = await client.start("slow_chain", 2.0, run_id=run_id)
        first = await wait_for(lambda r=run_id: _async(steps.starts(r, "slow")), what="slow step")
        pid = first[0][0]
        await anyio.sleep(0.3)  # the scenario: 0.3 s into a 2 s step
        victim = workers.by_pid(pid)
        killed_at = time.time()
        victim.kill()
        again = await wait_for(
            lambda r=run_id, p=pid: _async([s for s in steps.starts(r, "slow") if s[0] != p]),
            what="the step to restart on another worker",
        )
        delays.append(again[0][1] - killed_at)
        victim.wait()
        workers.start()
        result = await handle.result(timeout=20)
        assert result[0].startswith("first@") and result[1] == f"slow@{again[0][0]}"
        await one_completion_per_step(client, run_id)
        counts = steps.executions()
        assert counts[(run_id, "first")] == 1
        assert counts[(run_id, "slow")] == 2
        assert counts[(run_id, "last")] == 1
    print(f"kill to restart elsewhere: {[round(d, 3) for d in delays]}")
    assert statistics.median(delays) <= 1.5


async def _async(value: object) -> object:
    return value


async def test_sigstopped_worker_is_fenced_when_it_wakes(
    client: Client, engine: Engine, make_workers: Callable[[float], Workers], steps: StepLog
) -> None:
    workers = make_workers(2.0)
    sleeper = workers.start()
    await registered(client, 1)
    handle = await client.start("slow_chain", 3.0, run_id="stopped-1")
    await wait_for(lambda: _async(steps.starts("stopped-1", "slow")), what="the slow step")
    sleeper.send_signal(signal.SIGSTOP)
    rescuer = workers.start()
    result = await handle.result(timeout=30)
    assert result[1] == f"slow@{rescuer.pid}"
    sleeper.send_signal(signal.SIGCONT)

    async def stepped_back() -> bool:
        text = sleeper.log.read_text()  # type: ignore[attr-defined]
        return "stepping back" in text

    await wait_for(stepped_back, timeout=15, what="the woken worker to step back")
    await anyio.sleep(0.5)  # give a second, wrong log line the chance to appear
    text = sleeper.log.read_text()  # type: ignore[attr-defined]
    assert text.count("stepping back") == 1, text
    assert "Traceback" not in text
    assert sleeper.poll() is None  # it keeps running
    await one_completion_per_step(client, "stopped-1")
    assert (await client.describe("stopped-1")).status == "completed"


async def test_sigterm_finishes_the_step_and_hands_the_run_back(
    client: Client, engine: Engine, make_workers: Callable[[float], Workers], steps: StepLog
) -> None:
    workers = make_workers(15.0)
    leaving = workers.start()
    await registered(client, 1)
    # The slow step outlasts starting a second worker process on a loaded machine.
    handle = await client.start("slow_chain", 5.0, run_id="term-1")
    await wait_for(lambda: _async(steps.starts("term-1", "slow")), what="the slow step")
    staying = workers.start()
    await registered(client, 2)
    leaving.send_signal(signal.SIGTERM)
    assert await handle.result(timeout=20) == [
        f"first@{leaving.pid}",
        f"slow@{leaving.pid}",
        f"last@{staying.pid}",
    ]
    assert leaving.wait(timeout=10) == 0
    history = await client.history("term-1")
    slow_done = next(
        e
        for e in history
        if e.__struct_config__.tag == "step_completed" and getattr(e, "name", None) == "slow"
    )
    claims = [e for e in history if e.__struct_config__.tag == "run_claimed"]
    assert claims[-1].worker != claims[0].worker  # type: ignore[union-attr]
    handed_over = (claims[-1].at - slow_done.at).total_seconds()
    # The promise: handed back at once, not after the leaving worker's 15 s lease lapses.
    # ~10 ms on an idle box; 1.0 s was missed by 7 ms on a loaded 2-core CI box (two worker
    # processes, the engine and the server on 2 cores), so allow 5 s, still a third of it.
    assert handed_over < 5.0, handed_over
    assert steps.executions()[("term-1", "slow")] == 1


async def test_server_restart_with_fifty_runs_in_flight(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    make_workers: Callable[[float], Workers],
    steps: StepLog,
) -> None:
    workers = make_workers(5.0)
    workers.start()
    workers.start()
    await registered(client, 2)
    handles = [await client.start("five_steps", 0.3, run_id=f"restart-{i}") for i in range(50)]

    async def some_progress() -> bool:
        return len(steps.rows()) >= 60

    await wait_for(some_progress, timeout=30, what="runs in flight")
    nats_server.restart()
    for handle in handles:
        assert await handle.result(timeout=90) == 5
    for handle in handles:
        await one_completion_per_step(client, handle.run_id)
    assert all(p.poll() is None for p in workers.procs)


async def test_a_server_killed_with_runs_in_flight_loses_no_step_and_no_process(
    client: Client,
    nats_server: EmbeddedServer,
    make_workers: Callable[[float], Workers],
    steps: StepLog,
    tmp_path: Path,
) -> None:
    """A SIGKILLed server says no goodbye: its sockets die under writes nats-py has not yet
    seen fail. The engine and two workers, real processes, ride it out: every run ends,
    each step is recorded once, the engine's index catches up, and no process died."""
    engine_log = tmp_path / "engine.log"
    engine_proc = spawn_engine(nats_server.url, "--metrics-port", "0", log=engine_log)
    try:
        workers = make_workers(5.0)
        workers.start()
        workers.start()
        await registered(client, 2)
        handles = [await client.start("five_steps", 0.05, run_id=f"killed-{i}") for i in range(100)]

        async def indexed(status: str, count: int) -> bool:
            return len(await client.list("five_steps", status, limit=200)) >= count

        await wait_for(lambda: indexed("running", 1), timeout=30, what="the engine's index")

        async def some_progress() -> bool:
            return len(steps.rows()) >= 150

        await wait_for(some_progress, timeout=30, what="runs in flight")
        nats_server.restart(hard=True)
        for handle in handles:
            assert await handle.result(timeout=90) == 5
        for handle in handles:
            await one_completion_per_step(client, handle.run_id)
        await wait_for(lambda: indexed("completed", 100), timeout=30, what="all indexed")
        assert all(p.poll() is None for p in workers.procs)
        assert engine_proc.poll() is None, engine_log.read_text()[-4000:]
    finally:
        stop(engine_proc, signal.SIGTERM)
    for log in (engine_log, *(p.log for p in workers.procs)):  # type: ignore[attr-defined]
        text = log.read_text()
        # A reconnect is no error: nats-py's own ERROR line for each lost connection that
        # natflow opened without callbacks (the heartbeat's) said otherwise.
        assert "Traceback" not in text and " ERROR " not in text, text[-4000:]


async def test_chaos_random_kills_lose_and_duplicate_nothing(
    client: Client, engine: Engine, make_workers: Callable[[float], Workers], steps: StepLog
) -> None:
    rng = random.Random(7)
    workers = make_workers(15.0)
    for _ in range(3):
        workers.start()
    await registered(client, 3)
    handles = [await client.start("five_steps", 0.05, run_id=f"chaos-{i}") for i in range(200)]
    kills: dict[int, float] = {}  # pid -> when it was killed
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        await anyio.sleep(rng.uniform(2.0, 4.0))
        victim = rng.choice(workers.live())
        victim.kill()
        kills[victim.pid] = time.time()
        victim.wait()
        workers.start()
        infos = [await client.describe(h.run_id) for h in handles]
        if all(info.status == "completed" for info in infos):
            break
    for handle in handles:
        assert await handle.result(timeout=60) == 5
        await one_completion_per_step(client, handle.run_id)
    counts = steps.executions()
    assert set(counts) == {(h.run_id, f"s{i}") for h in handles for i in range(5)}
    assert all(n <= 2 for n in counts.values())
    twice = [key for key, n in counts.items() if n > 1]
    for run, step in twice:
        first_pid, first_at = min(steps.starts(run, step), key=lambda s: s[1])
        # Only a step in flight on a worker when it was killed may run again.
        assert first_pid in kills and kills[first_pid] >= first_at, (run, step)
    print(f"chaos: {len(kills)} kills, {len(twice)} of {len(counts)} steps re-ran")
