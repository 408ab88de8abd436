"""Concurrency limits with several worker processes against one server (real SIGKILL)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import anyio.lowlevel
from natflow import Client
from natflow_engine import LimitGroup, read_limit_slots
from natflow_engine._engine import Engine
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer

from tests import workflows_limits as wl
from tests.helpers import spawn_worker, stop, wait_for
from tests.test_limits import intervals, most_at_once

TARGET = "tests.workflows_limits:make_worker"


def _spawn(
    url: str, tmp_path: Path, name: str, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    env = {wl.LOG_ENV: str(tmp_path / "intervals.log"), wl.GATE_ENV: str(tmp_path / "gates")}
    proc = spawn_worker(url, TARGET, env=env, log=tmp_path / f"{name}.log")
    processes.append(proc)
    return proc


async def _registered(client: Client, count: int) -> None:
    async def enough() -> bool:
        return len(await list_workers(client.connection)) >= count

    await wait_for(enough, timeout=30, what=f"{count} workers registered")


async def test_fifty_runs_per_key_on_three_workers_never_run_more_than_two_of_a_key(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    (tmp_path / "gates").mkdir()
    for i in range(3):
        _spawn(nats_server.url, tmp_path, f"worker-{i}", processes)
    await _registered(client, 3)
    began = time.monotonic()
    handles = [
        await client.start(wl.per_key, {"key": key, "seconds": 0.05}, run_id=f"{key}-{i}")
        for i in range(50)
        for key in "AB"
    ]
    for handle in handles:
        assert await handle.result(timeout=120) in ("A", "B")
    took = time.monotonic() - began
    spans = intervals(tmp_path / "intervals.log")
    for key in "AB":
        assert len(spans[key]) == 50
        assert len({run for _, _, run in spans[key]}) == 50  # each ran once
        assert most_at_once(spans[key]) == 2  # never more, and the limit was used
    pids = {line.split()[4] for line in (tmp_path / "intervals.log").read_text().splitlines()}
    print(f"100 runs, max 2 per key, 3 workers: {took:.1f} s; ran on {len(pids)} processes")
    assert len(pids) >= 2  # the limit held across processes, not inside one


async def test_a_killed_workers_slots_are_free_within_two_seconds(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    victim = _spawn(nats_server.url, tmp_path, "victim", processes)
    await _registered(client, 1)
    group = LimitGroup("workflow:gated_pair", "")
    handles = [await client.start(wl.gated_pair, "x", run_id=f"held-{i}") for i in range(2)]

    async def both_held() -> set[str]:
        slots = await read_limit_slots(client.connection, group)
        workers = {slot.worker for slot, _ in slots.held.values() if slot.state == "held"}
        return workers if len(slots.held) == 2 else set()

    (holder,) = await wait_for(both_held, timeout=20, what="both slots held")
    third = await client.start(wl.gated_pair, "x", run_id="held-2")  # waits for a slot
    rescuer = _spawn(nats_server.url, tmp_path, "rescuer", processes)
    await _registered(client, 2)
    killed_at = time.monotonic()
    stop(victim, signal.SIGKILL)

    async def freed() -> bool:
        slots = await read_limit_slots(client.connection, group)
        return all(slot.worker != holder for slot, _ in slots.held.values())

    await wait_for(freed, timeout=5, what="the dead worker's slots freed")
    took = time.monotonic() - killed_at
    print(f"slots of a SIGKILLed worker free after {took:.2f} s")
    assert took < 2.0
    (gates / "all").touch()
    for handle in [*handles, third]:
        assert await handle.result(timeout=30) == "pair"
    assert rescuer.poll() is None
    spans = intervals(tmp_path / "intervals.log")["pair"]
    assert sorted(run for _, _, run in spans) == ["held-0", "held-1", "held-2"]
    assert most_at_once(spans) <= 2
    await anyio.lowlevel.checkpoint()
