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
from tests.test_poison import workers_up
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
