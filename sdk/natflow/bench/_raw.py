"""``natflow bench`` phase 1: the raw JetStream limit every other figure is read against.

Sync ``js.publish`` round trips (busy, and idle with a gap between them) and pipelined
``publish_async``, into a scratch stream, from the bench's own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

import nats.errors
import nats.js.errors
from natflow_engine import NatflowError, ServerUnavailable, redact_url, replicas
from nats.js import api

from ._report import Raw, stats
from ._session import BenchSession
from ._sizes import IDLE_GAP

_PAYLOAD = b"x" * 300


async def raw_baseline(bench: BenchSession) -> Raw:
    bench.progress.begin("raw JetStream publish")
    conn = bench.client.connection
    stream, prefix = f"NATFLOW_BENCH_{bench.nonce}", f"natflow-bench.{bench.nonce}"
    with _named_failures(bench.url):
        await conn.jsm.add_stream(
            name=stream,
            subjects=[f"{prefix}.>"],
            storage=api.StorageType.FILE,
            num_replicas=replicas(),
        )
        return await _measure(bench, stream, prefix)


async def _measure(bench: BenchSession, stream: str, prefix: str) -> Raw:
    conn = bench.client.connection
    sizes = bench.sizes
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


@contextlib.contextmanager
def _named_failures(url: str) -> Iterator[None]:
    """nats-py's errors as natflow's, naming their cause: this phase is the bench's first to
    use JetStream, so a server without it, or one refusing natflow's settings, fails here."""
    where = redact_url(url)
    try:
        yield
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as exc:
        domain = os.environ.get("NATFLOW_DOMAIN")
        scope = f" in JetStream domain {domain!r} (NATFLOW_DOMAIN)" if domain else ""
        raise ServerUnavailable(
            f"JetStream does not answer at {where}{scope}: is it enabled on the server "
            "(`jetstream {}` in its configuration, `-js`)?"
        ) from exc
    except nats.js.errors.APIError as exc:
        hint = ""
        if "replicas" in str(exc.description) and "NATFLOW_REPLICAS" in os.environ:
            hint = f"; NATFLOW_REPLICAS={replicas()} asks for that many replicas of each stream"
        raise NatflowError(
            f"the server at {where} refused the bench's raw JetStream stream: "
            f"{exc.description} (error {exc.err_code}){hint}"
        ) from exc
    except nats.errors.Error as exc:
        raise ServerUnavailable(
            f"JetStream at {where} failed the bench's raw publishes: {type(exc).__name__} {exc}"
        ) from exc


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
