"""What an engine reads as it starts: not the whole run index. Replicas restarted together
(a deploy, or `natflow bench` starting them for each phase) each read every run's summary
twice at once, beside the runs they served: for the runs-by-status gauges and for the first
retention sweep."""

from __future__ import annotations

import anyio
import pytest
from natflow import Client
from natflow_engine._engine_metrics import EngineMetrics
from natflow_engine._retention import RetentionService
from natflow_engine._streams import ensure_streams


async def test_the_runs_by_status_count_comes_a_few_polls_after_the_start(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = client.connection
    await ensure_streams(conn)
    metrics = EngineMetrics(conn, interval=0.01, runs_every=3)
    counted: list[int] = []
    real = metrics._runs

    async def runs() -> None:
        counted.append(metrics.polls)
        await real()

    monkeypatch.setattr(metrics, "_runs", runs)
    for _ in range(6):
        await metrics.poll()
    assert counted == [3, 6]  # not at the first poll


async def test_the_first_retention_sweep_waits_a_sweep_interval(client: Client) -> None:
    conn = client.connection
    await ensure_streams(conn)
    sweeps = RetentionService(conn, retention=2.0)  # a sweep every 0.5 s
    swept: list[float] = []
    first = anyio.Event()
    real = sweeps.sweep

    async def sweep() -> int:
        swept.append(anyio.current_time())
        first.set()
        return await real()

    sweeps.sweep = sweep  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        began = anyio.current_time()
        tg.start_soon(sweeps.run)
        with anyio.fail_after(5):
            await first.wait()
        tg.cancel_scope.cancel()
    assert swept[0] - began >= 0.45
