"""Redeliveries never move a run away from a live holder; a cluster's leaders can die."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

import anyio
from natflow import Client
from natflow_engine._leases import Leases
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunClaimed, StepCompleted

from tests.helpers import count_lines, spawn_worker, stop, wait_for
from tests.test_poison import counts as poison_counts
from tests.test_poison import spawn, workers_up
from tests.workflows_proc import COUNTS_ENV, GATE_ENV

TARGET = "tests.workflows_proc:make_worker"


async def test_a_redelivery_while_the_holder_is_alive_does_not_move_the_run(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    counts, gates = tmp_path / "counts.txt", tmp_path / "gates"
    gates.mkdir()
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    procs = [
        spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / f"w{i}.log") for i in range(2)
    ]
    try:
        await workers_up(client, 2)
        handle = await client.start("crash_counter", 1, run_id="redeliver-1")

        async def in_step_three() -> bool:
            steps = await client.steps("redeliver-1")
            return [s.status for s in steps] == ["completed", "completed", "running"]

        await wait_for(in_step_three, timeout=30, what="step three running")
        lease = await Leases(client.connection).get("redeliver-1")
        assert lease is not None
        # What a consumer leader change does to in-flight tasks: deliver them again.
        for _ in range(6):
            await client.connection.nc.publish(lease[0].ack_subject, b"-NAK")
            await anyio.sleep(0.3)
        (gates / "redeliver-1").touch()
        assert await handle.result(timeout=30) == {"one": 1, "two": 2, "three": 3}
        history = await client.history("redeliver-1")
        claims = [e for e in history if isinstance(e, RunClaimed)]
        assert len(claims) == 1, claims
        completed = Counter(e.name for e in history if isinstance(e, StepCompleted))
        assert completed == Counter({"one": 1, "two": 1, "three": 1})
        assert count_lines(counts)["redeliver-1:three"] == 1
        assert [p.poll() for p in procs] == [None, None]
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
        assert "leaving it there" in logs
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


async def test_a_step_that_blocks_the_loop_keeps_its_run_and_is_reported_by_name(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    procs = spawn(nats_server, tmp_path, 2)
    try:
        await workers_up(client, 2)
        # time.sleep(6) inside an async step, with a 2 s lease: three lease periods blocked.
        handle = await client.start("blocker", 6.0, run_id="block-1")
        others = [await client.start("doubler", i, run_id=f"other-{i}") for i in range(5)]
        assert await handle.result(timeout=60) == "slept"
        for i, other in enumerate(others):
            assert await other.result(timeout=30) == 2 * i
        assert poison_counts(tmp_path / "counts.txt")["block-1:sleeps_blocking"] == 1
        claims = [e for e in await client.history("block-1") if isinstance(e, RunClaimed)]
        assert len(claims) == 1, claims
        assert [p.poll() for p in procs] == [None, None]
        logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
        assert "event loop has been blocked" in logs and "'sleeps_blocking' of run block-1" in logs
        assert "lease taken by another worker" not in logs
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
