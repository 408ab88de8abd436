"""``natflow bench`` phase 1: the raw JetStream limit every other figure is read against.

Sync ``js.publish`` round trips (busy, and idle with a gap between them) and pipelined
``publish_async``, into a scratch stream, from the bench's own process.
"""

from __future__ import annotations

import asyncio
import time

from natflow_engine import replicas
from nats.js import api

from ._report import Raw, stats
from ._session import BenchSession
from ._sizes import IDLE_GAP

_PAYLOAD = b"x" * 300


async def raw_baseline(bench: BenchSession) -> Raw:
    bench.progress.begin("raw JetStream publish")
    conn = bench.client.connection
    sizes = bench.sizes
    stream, prefix = f"NATFLOW_BENCH_{bench.nonce}", f"natflow-bench.{bench.nonce}"
    await conn.jsm.add_stream(
        name=stream,
        subjects=[f"{prefix}.>"],
        storage=api.StorageType.FILE,
        num_replicas=replicas(),
    )
    try:
        for i in range(100):  # warm-up
            await conn.js.publish(f"{prefix}.w{i % 10}", _PAYLOAD)
        t0 = time.perf_counter()
        busy = await _sync_publishes(bench, prefix, sizes.raw_sync, gap=0.0)
        sync_rate = sizes.raw_sync / (time.perf_counter() - t0)
        bench.progress.update("idle round trips")
        idle = await _sync_publishes(bench, prefix, sizes.idle_samples, gap=IDLE_GAP)
        bench.progress.update(f"pipelining {sizes.raw_async:,}")
        async_rate = await _pipelined(bench, prefix, sizes.raw_async)
    finally:
        await conn.jsm.delete_stream(stream)
    rtt, idle_rtt = stats(busy), stats(idle)
    bench.progress.end(
        f"round trip p50 {rtt.p50:.2f} ms, p99 {rtt.p99:.2f} ms, idle p50 "
        f"{idle_rtt.p50:.2f} ms; pipelined {async_rate:,.0f} msg/s"
    )
    return Raw(
        publish_rtt_ms=rtt,
        publish_sync_msgs_per_s=sync_rate,
        idle_publish_rtt_ms=idle_rtt,
        pipelined_msgs=sizes.raw_async,
        pipelined_msgs_per_s=async_rate,
    )


async def _sync_publishes(bench: BenchSession, prefix: str, count: int, gap: float) -> list[float]:
    """Round trips of ``count`` sync publishes in ms, ``gap`` seconds apart."""
    js = bench.client.connection.js
    latencies = []
    for i in range(count):
        if gap:
            await asyncio.sleep(gap)
        t = time.perf_counter()
        await js.publish(f"{prefix}.r{i % 100}", _PAYLOAD)
        latencies.append((time.perf_counter() - t) * 1e3)
    return latencies


async def _pipelined(bench: BenchSession, prefix: str, count: int) -> float:
    """Messages per second of ``count`` pipelined publishes (4,000 in flight)."""
    js = bench.client.connection.nc.jetstream(publish_async_max_pending=4000)
    t0 = time.perf_counter()
    for i in range(count):
        await js.publish_async(f"{prefix}.p{i % 1000}", _PAYLOAD)
    await js.publish_async_completed()
    return count / (time.perf_counter() - t0)
