"""``natflow bench`` schedule phase: a schedule firing every second, served by the engine.

Lateness is each run's ``run_started`` time minus its fire time (both in history: the fire
time is the run's ``trigger.fire_time``). Exactly once: every fire time up to the pause has
one run, with one ``run_started``, and no run started before its fire time.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from natflow_engine import RunNotFound
from natflow_engine.events import RunStarted

from .._client import Client
from ._report import ScheduleFires, stats
from ._workflows import bench_steps


async def schedule_lateness(
    client: Client, schedule_id: str, seconds: float
) -> tuple[ScheduleFires, list[str]]:
    """Create ``schedule_id`` firing every second, let it run ``seconds``, read its runs;
    returns the figures and the ids of every run the schedule started."""
    info = await client.schedules.create(schedule_id, bench_steps, 1, every=1, overlap="allow_all")
    created = info.created_at or datetime.now(UTC)  # fires come after this moment
    try:
        await asyncio.sleep(seconds)
    finally:
        pausing = datetime.now(UTC)
        await client.schedules.pause(schedule_id)
    await asyncio.sleep(1.0)  # a fire decided just before the pause gets its run
    # Every fire due before the pause was asked for must have its run; one due while the
    # pause was on its way may have one too (the schedule records it), and counts then.
    recorded = {
        f.fire_time: f.run_id for f in (await client.schedules.describe(schedule_id)).recent_runs
    }
    last = max([pausing, *recorded])
    first = created.replace(microsecond=0) + timedelta(seconds=1)
    count = int((last - first).total_seconds()) + 1 if last >= first else 0
    fires = [first + timedelta(seconds=i) for i in range(count)]
    late: list[float] = []
    once = True
    run_ids = [f"{schedule_id}-{fire:%Y%m%dT%H%M%SZ}" for fire in fires]
    for fire, run_id in zip(fires, run_ids, strict=True):
        starts = await _starts(client, run_id)
        once = once and len(starts) == 1
        late.extend((s.at - fire).total_seconds() * 1000 for s in starts)
    await client.schedules.delete(schedule_id)
    started = {r for r in recorded.values() if r is not None}
    figures = ScheduleFires(
        seconds=seconds,
        fires=len(fires),
        runs=len(late),
        lateness_ms=stats(late),
        exactly_once=once and len(late) == len(fires),
        early=sum(1 for v in late if v < 0),
    )
    return figures, sorted(started.union(run_ids))


async def _starts(client: Client, run_id: str) -> list[RunStarted]:
    try:
        events = await client.history(run_id)
    except RunNotFound:
        return []
    return [e for e in events if isinstance(e, RunStarted)]
