"""``natflow bench`` phase 5: a fresh process reads and rebuilds runs of 1,000 and 10,000
events, written through the one write path on a queue no worker serves."""

from __future__ import annotations

import asyncio
import sys
import time

import msgspec
from natflow_engine import HistoryStore, NatflowError
from natflow_engine.events import NULL, RunClaimed, RunStarted, StepCompleted, utcnow

from ._report import Replay, stats
from ._session import BenchSession
from ._workflows import STEP_NAME, ReplayTimes, bench_steps

REPLAY_QUEUE = "natflow-bench-replay"  # served by no worker: replay histories stay untouched


async def replay(bench: BenchSession) -> list[Replay]:
    sizes = bench.sizes.replay_events
    bench.progress.begin(f"replay of {' and '.join(f'{n:,}' for n in sizes)} events")
    found = []
    for events in sizes:
        bench.progress.update(f"writing {events:,} events")
        run_id = bench.run_id(f"replay-{events}")
        appends = await write_history(bench, run_id, events)
        bench.progress.update(f"rebuilding {events:,} events")
        times = await replay_probe(bench, run_id)
        if times.events != events:
            raise NatflowError(f"replay read {times.events} events, wrote {events}")
        warm = times.read_ms[1:] or times.read_ms
        warm_rebuild = times.rebuild_ms[1:] or times.rebuild_ms
        totals = [a + b for a, b in zip(warm, warm_rebuild, strict=True)]
        kib = times.peak_rss_kib / (1024 if sys.platform == "darwin" else 1)
        found.append(
            Replay(
                events=events,
                repeats=len(times.read_ms),
                read_ms=stats(warm).p50,
                rebuild_ms=stats(warm_rebuild).p50,
                total_ms=stats(totals).p50,
                cold_ms=times.read_ms[0] + times.rebuild_ms[0],
                append_ms=stats(appends),
                peak_rss_mib=kib / 1024,
            )
        )
    bench.progress.end("; ".join(f"{r.events:,} events {r.total_ms:.1f} ms" for r in found))
    return found


async def write_history(bench: BenchSession, run_id: str, events: int) -> list[float]:
    """A run of ``events`` events through the one write path (conditional appends);
    returns each append's round trip in ms."""
    store = HistoryStore(bench.client.connection)
    n = events - 2
    now = utcnow()
    last = await store.append(
        run_id,
        RunStarted(
            id=f"{run_id}:1",
            at=now,
            workflow=bench_steps.name,
            queue=REPLAY_QUEUE,
            input=msgspec.Raw(str(n).encode()),
        ),
        0,
    )
    last = await store.append(
        run_id, RunClaimed(id=f"{run_id}:2", at=utcnow(), worker="natflow-bench"), last
    )
    latencies = []
    for seq in range(1, n + 1):
        event = StepCompleted(
            id=f"{run_id}:{seq + 2}",
            at=utcnow(),
            seq=seq,
            name=STEP_NAME,
            occurrence=seq,
            started_at=now,
            result=NULL,
        )
        t = time.perf_counter()
        last = await store.append(run_id, event, last)
        latencies.append((time.perf_counter() - t) * 1e3)
    return latencies


async def replay_probe(
    bench: BenchSession, run_id: str, workflow: str = bench_steps.name
) -> ReplayTimes:
    """A fresh process reads and rebuilds the run (``replay_repeat`` times)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natflow.bench._workflows",
        "replay",
        bench.url,
        run_id,
        str(bench.sizes.replay_repeat),
        workflow,
        env=bench.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    if proc.returncode != 0:
        raise NatflowError(f"the replay probe failed:\n{err.decode(errors='replace')[-2000:]}")
    return msgspec.json.decode(out, type=ReplayTimes)
