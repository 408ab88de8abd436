"""A worker process killed mid-run: another one resumes it, and no recorded step runs again."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

from natflow import Client
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunClaimed, StepCompleted

from tests.helpers import count_lines, spawn_worker, stop, wait_for
from tests.workflows_proc import COUNTS_ENV, GATE_ENV

TARGET = "tests.workflows_proc:make_worker"


async def test_sigkill_after_step_two_resumes_without_rerunning_recorded_steps(
    client: Client, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    counts = tmp_path / "counts.txt"
    gates = tmp_path / "gates"
    gates.mkdir()
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    run_id = "crash-1"

    first = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-1.log")
    second = None
    try:
        handle = await client.start("crash_counter", 5, run_id=run_id)

        async def in_step_three() -> bool:
            steps = await client.steps(run_id)
            return [(s.name, s.status) for s in steps] == [
                ("one", "completed"),
                ("two", "completed"),
                ("three", "running"),
            ]

        # Step two is recorded in history and step three is running (held at its gate).
        await wait_for(in_step_three, timeout=20, what="steps one and two recorded, three running")
        stop(first, signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        assert count_lines(counts) == Counter({f"{run_id}:one": 1, f"{run_id}:two": 1})

        (gates / run_id).touch()
        second = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-2.log")
        assert await handle.result(timeout=20) == {"one": 5, "two": 6, "three": 7}

        # SIGTERM drains: the worker exits cleanly once it holds nothing.
        stop(second, signal.SIGTERM)
        assert second.returncode == 0, (tmp_path / "worker-2.log").read_text()
    finally:
        stop(first)
        if second is not None:
            stop(second)

    assert count_lines(counts) == Counter(
        {f"{run_id}:one": 1, f"{run_id}:two": 1, f"{run_id}:three": 1}
    )
    history = await client.history(run_id)
    completed = Counter((e.name, e.occurrence) for e in history if isinstance(e, StepCompleted))
    assert completed == Counter({("one", 1): 1, ("two", 1): 1, ("three", 1): 1})
    claims = [e for e in history if isinstance(e, RunClaimed)]
    assert len(claims) == 2 and claims[0].worker != claims[1].worker
    assert claims[1].delivery >= 2  # the task came back by redelivery, not a new start
    info = await client.describe(run_id)
    assert info.status == "completed" and info.worker == claims[1].worker
