"""``natflow bench`` phases that need the engine: timer lateness and kill-to-restart.

Both run a real ``natflow engine`` process beside real worker processes, as in production:
the engine wakes sleeping runs, and its reaper hands a killed worker's runs to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from natflow_engine import (
    DISPATCHER,
    HISTORY_STREAM,
    TASK_STREAM,
    NatflowError,
    ends_with_parent,
    queue_consumer,
)
from natflow_engine.events import TimerFired, TimerScheduled

from .._client import Client
from ._procs import WorkerProcesses
from ._report import KillRestart, Timers, stats
from ._workflows import BENCH_QUEUE, bench_kill, bench_sleep

KILL_AFTER = 0.3  # seconds into the step
KILL_STEP = 2.0  # seconds the killed step would take


@contextlib.contextmanager
def engine_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "natflow_engine", "engine"],
            env={**env, "NATFLOW_ENGINE_METRICS_PORT": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=ends_with_parent(),  # a killed bench leaves no engine running
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def engine_processes(
    env: dict[str, str], logs: list[Path]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``natflow engine`` replica per log, all stopped on the way out."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(engine_process(env, log)) for log in logs]


async def timer_lateness(client: Client, run_ids: list[str], sleep_s: float) -> Timers:
    """Start every run (each sleeps ``sleep_s``) at once; read lateness from history."""
    handles = await asyncio.gather(*(client.start(bench_sleep, sleep_s, run_id=r) for r in run_ids))
    await asyncio.gather(*(h.result(timeout=60 + sleep_s) for h in handles))
    late: list[float] = []
    once = True
    early = 0
    for run_id in run_ids:
        events = await client.history(run_id)
        due = [e.due_at for e in events if isinstance(e, TimerScheduled)]
        fired = [e.at for e in events if isinstance(e, TimerFired)]
        once = once and len(due) == 1 and len(fired) == 1
        if due and fired:
            lateness = (fired[0] - due[0]).total_seconds() * 1000
            early += lateness < 0
            late.append(lateness)
    return Timers(
        count=len(run_ids),
        sleep_s=sleep_s,
        lateness_ms=stats(late),
        fired_once=once,
        early=early,
    )


async def kill_to_restart(
    client: Client,
    make_worker: Callable[[], WorkerProcesses],
    marks: Path,
    run_ids: list[str],
    ready: Callable[[int], Awaitable[None]],
) -> KillRestart:
    """Per round: kill the worker 0.3 s into a 2 s step; time until the step starts again."""
    workers = [make_worker(), make_worker()]
    delays: list[float] = []
    try:
        for run_id in run_ids:
            await ready(len(workers))
            seen = len(_marks(marks))
            handle = await client.start(bench_kill, KILL_STEP, run_id=run_id)
            pid, _ = (await _wait_marks(marks, seen + 1))[-1]
            await asyncio.sleep(KILL_AFTER)
            victim = next(w for w in workers if pid in w.pids)
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            _, restarted_at = (await _wait_marks(marks, seen + 2))[-1]
            delays.append((restarted_at - killed_at) * 1000)
            victim.stop()
            workers.remove(victim)
            workers.append(make_worker())
            await handle.result(timeout=30)
    finally:
        for w in workers:
            w.stop()
    return KillRestart(rounds=len(delays), restart_ms=stats(delays))


def _marks(path: Path) -> list[tuple[int, float]]:
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(pid), float(at)) for pid, at in rows]


async def _wait_marks(path: Path, count: int, timeout: float = 30.0) -> list[tuple[int, float]]:
    deadline = time.monotonic() + timeout
    while True:
        found = _marks(path)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise NatflowError(f"the bench's step did not start within {timeout:g} s")
        await asyncio.sleep(0.005)


async def pulls_waiting(client: Client, count: int, timeout: float = 30.0) -> None:
    """Until ``count`` workers have a pull waiting on the bench queue."""
    consumer = queue_consumer(BENCH_QUEUE, bench_sleep.name)
    await _until(client, TASK_STREAM, consumer, count, timeout, "workers")


async def engine_ready(client: Client, timeout: float = 30.0, replicas: int = 1) -> None:
    """Until the dispatcher of each of ``replicas`` engines is pulling history."""
    await _until(client, HISTORY_STREAM, DISPATCHER, replicas, timeout, "engine")


async def _until(
    client: Client, stream: str, consumer: str, waiting: int, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    jsm = client.connection.jsm
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # no consumer yet
            info = await jsm.consumer_info(stream, consumer)
            if info.num_waiting >= waiting:
                return
        await asyncio.sleep(0.05)
    raise NatflowError(f"the bench's {what} were not ready within {timeout:g} s")
