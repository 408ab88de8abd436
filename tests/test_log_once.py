"""``ctx.logger`` lines appear once across every worker a run passes through, kill after kill."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from natflow import Client
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import spawn_worker, stop, wait_for
from tests.workflows_replay import COUNTS_ENV, GATE_ENV

TARGET = "tests.workflows_replay:make_worker"
LINES = [
    "line before step 1",
    "line before step 2",
    "line before step 3",
    "line before sleep",
    "line before wait",
    "line before end",
]


@pytest.mark.slow
async def test_each_line_is_logged_once_though_a_worker_is_killed_at_every_point(
    client: Client, nats_server: EmbeddedServer, engine: Engine, tmp_path: Path
) -> None:
    run_id = "chatty-1"
    env = {COUNTS_ENV: str(tmp_path / "counts.txt"), GATE_ENV: str(tmp_path)}
    logs: list[Path] = []
    workers: list[subprocess.Popen[bytes]] = []

    def start_worker() -> None:
        logs.append(tmp_path / f"worker-{len(logs) + 1}.log")
        workers.append(spawn_worker(nats_server.url, TARGET, env=env, log=logs[-1]))

    def kill_worker() -> None:
        stop(workers[-1], signal.SIGKILL)

    async def step_running(n: int) -> bool:
        steps = await client.steps(run_id)
        return len(steps) == n and steps[-1].status == "running"

    async def status_is(status: str) -> bool:
        return (await client.describe(run_id)).status == status

    async def point(check: Callable[[], Awaitable[bool]], what: str) -> None:
        """Wait until the run is at this point (recorded in history), then kill its worker."""
        await wait_for(check, timeout=30, what=what)
        kill_worker()
        start_worker()

    try:
        start_worker()
        handle = await client.start("chatty", run_id=run_id)
        for n in (1, 2, 3):
            await point(lambda n=n: step_running(n), f"step {n} running")  # type: ignore[misc]
            (tmp_path / f"{run_id}-{n}").touch()
        await point(lambda: status_is("sleeping"), "the run sleeping")
        await point(lambda: status_is("waiting"), "the run waiting for 'go'")
        await client.signal(run_id, "go", "now")
        assert await handle.result(timeout=30) == "done now"
    finally:
        for proc in workers:
            stop(proc)

    assert len(workers) == 6
    seen: Counter[str] = Counter()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            for text in LINES:
                if line.endswith(f"[{run_id}] {text}"):
                    seen[text] += 1
    assert seen == Counter(dict.fromkeys(LINES, 1)), {p.name: p.read_text() for p in logs}
