"""How fast the console's runs page is with many runs stored (issue 15: first screen < 300 ms
with 100,000 runs).

Starts an embedded nats-server, publishes ``--runs`` run-index entries straight into
``NATFLOW_RUNS`` (what the engine writes for each run; no workflow runs, so filling 100,000
takes seconds), serves the console, and measures:

* the server's time to answer ``GET /runs`` (the first screen), cold and warm, and filtered
  (a rare status, a workflow, a page further back);
* how long the live counts take to load the whole index;
* with ``--browser``, Chromium's time from navigation to the first screen being painted.

Run: ``make bench-console``, or
``python -m natflow_engine.console._bench [--runs 100000] [--browser]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec

from natflow_engine._connect import connect
from natflow_engine._index import IndexEntry
from natflow_engine._server import EmbeddedServer
from natflow_engine._state import RunInfo
from natflow_engine._streams import ensure_streams, runs_subject
from natflow_engine.console import create_app, serve
from natflow_engine.console._pages import Console

WORKFLOWS = ["order", "refund", "invoice", "nightly-export", "onboarding", "sync-crm"]
STATUSES = ["completed"] * 90 + ["running"] * 3 + ["waiting"] * 3 + ["sleeping"] * 2
STATUSES += ["failed", "cancelled"]


def entry(n: int, now: datetime) -> bytes:
    created = now - timedelta(seconds=(100_000 - n) * 3)
    status = random.choice(STATUSES)
    closed = status in ("completed", "failed", "cancelled")
    info = RunInfo(
        run_id=f"run-{n:07d}",
        workflow=random.choice(WORKFLOWS),
        queue="default" if n % 7 else "payments",
        status=status,  # type: ignore[arg-type]
        created_at=created,
        updated_at=created + timedelta(seconds=2),
        closed_at=created + timedelta(seconds=2) if closed else None,
        result={"ok": True} if status == "completed" else None,
    )
    return msgspec.json.encode(IndexEntry(hseq=n * 10, info=info))


async def fill(url: str, runs: int) -> float:
    conn = await connect(url, name="bench-fill")
    await ensure_streams(conn)
    js = conn.nc.jetstream(publish_async_max_pending=4000)
    now = datetime.now(UTC)
    began = time.perf_counter()
    for n in range(1, runs + 1):
        await js.publish_async(runs_subject(f"run-{n:07d}"), entry(n, now))
    await js.publish_async_completed()
    took = time.perf_counter() - began
    await conn.close()
    return took


def get(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
        assert response.status == 200 and b"run-" in body, response.status
    return (time.perf_counter() - began) * 1000


def summary(label: str, samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[min(len(samples) - 1, int(len(samples) * 0.95))]
    return (
        f"{label:44} median {statistics.median(samples):6.1f} ms   p95 {p95:6.1f} ms   "
        f"max {samples[-1]:6.1f} ms   (n={len(samples)})"
    )


_PAINT = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const paint = performance.getEntriesByName("first-contentful-paint")[0];
  return [nav.responseStart - nav.requestStart, paint ? paint.startTime : -1];
}"""


async def browser_first_screen(base: str, rounds: int) -> tuple[list[float], ...]:
    """Per navigation: Playwright's wall time, time to first byte, first contentful paint;
    and, as this machine's baseline, the first paint of a one-line HTML page (served by the
    browser itself, so it measures nothing but Chromium's own cost)."""
    from playwright.async_api import async_playwright

    times: list[float] = []
    ttfb: list[float] = []
    paint: list[float] = []
    baseline: list[float] = []
    with tempfile.TemporaryDirectory() as profile:
        async with async_playwright() as pw:
            context = await pw.chromium.launch_persistent_context(
                profile,
                executable_path="/usr/bin/chromium",
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync", "--no-first-run"],
                viewport={"width": 1280, "height": 820},
            )  # fmt: skip
            page = await context.new_page()
            await page.route(
                f"{base}/baseline",
                lambda route: route.fulfill(body="<p>baseline</p>", content_type="text/html"),
            )
            for _ in range(rounds):
                began = time.perf_counter()
                await page.goto(f"{base}/runs", wait_until="domcontentloaded")
                await page.locator("tr.run-row").first.wait_for()
                times.append((time.perf_counter() - began) * 1000)
                first_byte, first_paint = await page.evaluate(_PAINT)
                ttfb.append(first_byte)
                paint.append(first_paint)
                await page.goto(f"{base}/baseline", wait_until="load")
                baseline.append((await page.evaluate(_PAINT))[1])
            await context.close()
    return times, ttfb, paint, baseline


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--browser", action="store_true", help="also time Chromium")
    args = parser.parse_args()
    random.seed(15)
    with tempfile.TemporaryDirectory() as store:
        server = EmbeddedServer(store_dir=Path(store) / "nats")
        server.start()
        try:
            took = await fill(server.url, args.runs)
            print(f"stored {args.runs:,} run index entries in {took:.1f} s")
            await measure(server.url, args)
        finally:
            server.stop()
    return 0


async def measure(url: str, args: argparse.Namespace) -> None:
    ports: list[int] = []
    ready = anyio.Event()
    app = create_app(lambda: connect(url, name="bench-console"), server=url)

    def on_ready(port: int) -> None:
        ports.append(port)
        ready.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(app, "127.0.0.1", 0, ready=on_ready))
        await ready.wait()
        began = time.perf_counter()
        await requests(f"http://127.0.0.1:{ports[0]}", app, began, args)
        tg.cancel_scope.cancel()


async def requests(base: str, app: Any, began: float, args: argparse.Namespace) -> None:
    cold = await asyncio.to_thread(get, f"{base}/runs")
    print(f"{'GET /runs, first request after start':44} {cold:6.1f} ms")
    console: Console = app.app.state.console
    while not console.counts.loaded:  # noqa: ASYNC110 (a benchmark polling a flag)
        await asyncio.sleep(0.05)
    print(f"live counts: {console.counts.total:,} runs counted "
          f"{time.perf_counter() - began:.1f} s after the console started")  # fmt: skip
    warm = [await asyncio.to_thread(get, f"{base}/runs") for _ in range(args.rounds)]
    print(summary("GET /runs (first screen, 50 runs)", warm))
    for label, query in (
        ("GET /runs?status=failed (1 % of runs)", "status=failed"),
        ("GET /runs?workflow=refund", "workflow=refund"),
        ("GET /runs?queue=payments&status=running", "queue=payments&status=running"),
        ("GET /runs?before=50000 (a page far back)", "before=50000"),
    ):
        samples = [await asyncio.to_thread(get, f"{base}/runs?{query}") for _ in range(10)]
        print(summary(label, samples))
    if args.browser:
        wall, ttfb, paint, baseline = await browser_first_screen(base, args.rounds)
        print(summary("Chromium: time to first byte", ttfb))
        print(summary("Chromium: first contentful paint", paint))
        print(summary("Chromium: first paint, one-line page (baseline)", baseline))
        print(summary("Chromium: goto + first row found (Playwright)", wall))


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
