"""``natflow bench``: natflow's speed beside the JetStream limit, measured in one run.

The phases, each one line of progress on stderr:

1. **raw**: sync ``js.publish`` round trips and pipelined ``publish_async`` into a scratch
   stream, from this process. Every other figure is read against these.
2. **sequential**: one run of N empty steps on a fresh worker process.
3. **throughput**: M runs of 3 empty steps, started at once by this one client, served by W
   worker processes.
4. **idle start latency**: one-step runs, one at a time, on an otherwise idle system.
5. **replay**: a fresh process reads and rebuilds runs of 1,000 and 10,000 events.

Then, with a real engine process: timer lateness, kill-to-restart, and a schedule firing every
second (``--quick``: for 5 s instead of 30 s; lateness and an exactly-once count); last, a
loop of 100,000 steps in one run through continue-as-new, and the replay of such a loop whose
worker is killed at a random point (``_continue``; ``--quick``: 2,500 and 3,000 steps).

Timer lateness and kill-to-restart (SIGKILL a worker mid-step, time until the step restarts
elsewhere) are listed under ``pending``; their phases go after phase 5 in :meth:`Bench.run`.

Workers are real ``natflow worker`` processes (``natflow.bench._workflows``), a fresh one per
phase, so each phase's peak RSS (``VmHWM``) is its own. By default the bench starts its own
nats-server with a temporary store; ``--url`` measures an existing deployment instead, on
its own queue, and removes the bench's runs afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
from natflow_engine import (
    DISPATCHER,
    HISTORY_STREAM,
    RUN_LEVEL_FILTER,
    RUNS_STREAM,
    TASK_PREFIX,
    TASK_STREAM,
    EmbeddedServer,
    HistoryStore,
    InvalidInput,
    NatflowError,
    connect_options,
    default_url,
    history_subject,
    queue_consumer,
    read_jsz,
    redact_url,
    replicas,
    runs_subject,
    shipped_server,
)
from natflow_engine.events import (
    NULL,
    RunClaimed,
    RunCompleted,
    RunStarted,
    StepCompleted,
    decode_event,
    event_kind,
    utcnow,
)
from nats.js import api

from .._client import Client
from ._continue import continue_loop
from ._procs import CpuWindow, Progress, WorkerProcesses
from ._report import (
    BenchReport,
    Environment,
    KillRestart,
    Raw,
    Replay,
    ScheduleFires,
    Sequential,
    StartLatency,
    Throughput,
    Timers,
    evaluate,
    render,
    stats,
)
from ._schedules import schedule_lateness
from ._waits import (
    engine_process,
    engine_ready,
    kill_to_restart,
    pulls_waiting,
    timer_lateness,
)
from ._workflows import BENCH_QUEUE, MARKS_ENV, STEP_NAME, ReplayTimes, bench_steps

log = logging.getLogger("natflow.bench")

PHASES = 9
PENDING: dict[str, str] = {}
REPLAY_QUEUE = "natflow-bench-replay"  # served by no worker: replay histories stay untouched
_PAYLOAD = b"x" * 300
_THREE = 3
_IDLE_GAP = 0.05  # seconds between idle round trips and between idle starts


@dataclass(frozen=True)
class Sizes:
    """How much each phase does. ``--quick`` shrinks everything for tests."""

    raw_sync: int = 2000
    raw_async: int = 20_000
    steps: int = 200
    runs: int = 500
    workers: int = 1
    idle_samples: int = 20
    replay_events: tuple[int, ...] = (1000, 10_000)
    replay_repeat: int = 5
    concurrency: int = 100
    timers: int = 200
    timer_sleep: float = 1.5  # over the 1 s a worker would wait for itself: the engine wakes it
    kill_rounds: int = 5
    schedule_seconds: float = 30.0
    loop_steps: int = 100_000  # one run through continue-as-new
    loop_kill_steps: int = 10_000  # a run whose worker is killed at a random point


QUICK = Sizes(
    raw_sync=200,
    raw_async=2000,
    steps=20,
    runs=30,
    idle_samples=5,
    replay_events=(100, 1000),
    replay_repeat=3,
    timers=20,
    kill_rounds=1,
    schedule_seconds=5.0,
    loop_steps=2_500,
    loop_kill_steps=3_000,
)


def register(sub: Any) -> None:
    """Add ``natflow bench`` to the CLI (entry point ``natflow.commands``)."""
    p = sub.add_parser("bench", help="measure natflow beside the raw JetStream limit")
    p.add_argument(
        "--url",
        dest="bench_url",
        default=None,
        metavar="URL",
        help="measure this server (default: an embedded one with a temporary store; "
        "NATFLOW_URL is not used, so a bench never lands on a server by accident)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps of the sequential run (200)")
    p.add_argument("--runs", type=int, default=None, help="runs of the throughput phase (500)")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes in the throughput phase (1)"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="max concurrent runs per worker (the worker's default, 100)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="the embedded server acknowledges before fsync (as `natflow dev --fast`); "
        "default: durable, as shipped",
    )
    p.add_argument(
        "--monitor",
        dest="bench_monitor",
        default=None,
        metavar="URL",
        help="with --url: the server's HTTP monitoring (http://host:8222), to report its "
        "durability mode",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON only")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds, for tests)")
    p.set_defaults(handler=run_bench_command)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    chosen = {
        k: getattr(args, k)
        for k in ("steps", "runs", "workers", "concurrency")
        if getattr(args, k) is not None
    }
    for name, value in chosen.items():
        if value < 1:
            raise InvalidInput(f"--{name} must be at least 1")
    return replace(sizes, **chosen)


async def run_bench_command(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    if args.log_level.upper() == "INFO":  # the default: keep stderr for the progress lines
        logging.getLogger("natflow").setLevel(logging.WARNING)
    url: str | None = args.bench_url
    if url is None and args.url != default_url():  # `natflow --url URL bench`
        url = args.url
    server: EmbeddedServer | None = None
    store = Path(tempfile.mkdtemp(prefix="natflow-bench-js-"))
    try:
        if url is None:  # as shipped: natflow's own configuration (durable unless --fast)
            server = shipped_server(store, fast=args.fast).start()
            url = server.url
        bench = Bench(url, args, sizes, server)
        report = await bench.run()
    finally:
        if server is not None:
            server.cleanup()
        shutil.rmtree(store, ignore_errors=True)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        sys.stdout.write("\n")
    else:
        print(render(report))
    return 0


# -- the bench ---------------------------------------------------------------------------


class Bench:
    """Runs every phase against one server and assembles the :class:`BenchReport`."""

    def __init__(
        self, url: str, args: argparse.Namespace, sizes: Sizes, server: EmbeddedServer | None
    ) -> None:
        self.url = url
        self.sizes = sizes
        self.server = server
        self.quick = bool(args.quick)
        self._options = connect_options(args)
        self._dir = Path(tempfile.mkdtemp(prefix="natflow-bench-"))
        self._env = self._child_env(args)
        self.nonce = uuid.uuid4().hex[:8]
        self.progress = Progress(PHASES)
        self.run_ids: list[str] = []
        self._load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self._client: Client | None = None
        self._monitor: str | None = getattr(args, "bench_monitor", None)
        if self._monitor is None and server is not None and server.http_port:
            self._monitor = f"http://127.0.0.1:{server.http_port}"
        self._durability = "unknown (pass --monitor URL)"

    def _child_env(self, args: argparse.Namespace) -> dict[str, str]:
        env = {
            **os.environ,
            "NATFLOW_URL": self.url,
            "NATFLOW_LOG_LEVEL": "WARNING",
            "NATFLOW_WORKER_METRICS_PORT": "0",
            MARKS_ENV: str(self._dir / "marks"),
        }
        for name in ("creds", "user", "password", "token", "tls_ca", "tls_cert", "tls_key"):
            value = getattr(args, name, None)
            if value:
                env[f"NATFLOW_{name.upper()}"] = str(value)
        return env

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    def run_id(self, kind: str) -> str:
        run_id = f"nb-{self.nonce}-{kind}"
        self.run_ids.append(run_id)
        return run_id

    async def run(self) -> BenchReport:
        t0 = time.perf_counter()
        self._client = await Client.connect(self.url, **self._options)
        if self._monitor is not None:
            try:
                self._durability = (await read_jsz(self._monitor)).durability()
            except NatflowError as exc:
                self._durability = f"unknown ({exc})"
        ok = False
        try:
            raw = await self.raw_baseline()
            sequential = await self.sequential(raw)
            throughput = await self.throughput()
            idle = await self.start_latency()
            replay = await self.replay()
            timers, kill, fires = await self.waits()
            loop = await continue_loop(self)
            ok = True
        finally:
            if self.server is None:
                await self._remove_bench_runs()
            await self.client.close()
            if ok:
                shutil.rmtree(self._dir, ignore_errors=True)
            else:
                print(f"natflow bench: worker logs are in {self._dir}", file=sys.stderr)
        report = BenchReport(
            environment=self._environment(),
            quick=self.quick,
            elapsed_s=time.perf_counter() - t0,
            raw=raw,
            sequential=sequential,
            throughput=throughput,
            start_latency=idle,
            replay=replay,
            timers=timers,
            kill_to_restart=kill,
            schedules=fires,
            continue_as_new=loop,
            pending=dict(PENDING),
            targets=[],
        )
        report.targets = evaluate(report)
        return report

    @property
    def env(self) -> dict[str, str]:
        """The environment of the bench's child processes."""
        return self._env

    @property
    def dir(self) -> Path:
        """Where the bench's child processes write their logs."""
        return self._dir

    def _environment(self) -> Environment:
        info: dict[str, Any] = getattr(self.client.connection.nc, "_server_info", None) or {}
        return Environment(
            server=redact_url(self.url),
            server_version=str(info.get("version", "?")),
            embedded=self.server is not None,
            python=platform.python_version(),
            cpus=os.cpu_count() or 0,
            platform=platform.platform(),
            load_before=self._load_before,
            durability=self._durability,
        )

    # -- helpers ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def workers(self, phase: str, count: int) -> AsyncIterator[WorkerProcesses]:
        logs = [self._dir / f"worker-{phase}-{i}.log" for i in range(count)]
        procs = WorkerProcesses(count, self._env, logs, self.sizes.concurrency)
        procs.start()
        try:
            await self._wait_ready(procs)
            yield procs
        finally:
            procs.stop()

    async def _wait_ready(self, procs: WorkerProcesses, timeout: float = 30.0) -> None:
        """Until every worker has a pull waiting on the queue, then a few warm-up runs."""
        deadline = time.monotonic() + timeout
        jsm = self.client.connection.jsm
        while True:
            procs.check_alive()
            with contextlib.suppress(Exception):  # no consumer yet: no worker is up
                consumer = queue_consumer(BENCH_QUEUE, bench_steps.name)
                info = await jsm.consumer_info(TASK_STREAM, consumer)
                if info.num_waiting >= procs.count:
                    break
            if time.monotonic() > deadline:
                raise NatflowError(f"bench workers were not ready within {timeout:g} s")
            await asyncio.sleep(0.05)
        warm = [self.run_id(f"warm-{uuid.uuid4().hex[:6]}") for _ in range(4 * procs.count)]
        handles = [await self.client.start(bench_steps, _THREE, run_id=r) for r in warm]
        await asyncio.gather(*(h.result(timeout=30) for h in handles))

    @property
    def _server_pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def _cpu(self, procs: WorkerProcesses) -> CpuWindow:
        return CpuWindow(procs.pids, self._server_pid)

    # -- 1. raw ----------------------------------------------------------------------------

    async def raw_baseline(self) -> Raw:
        self.progress.begin("raw JetStream publish")
        conn = self.client.connection
        stream, prefix = f"NATFLOW_BENCH_{self.nonce}", f"natflow-bench.{self.nonce}"
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
            busy = await self._sync_publishes(prefix, self.sizes.raw_sync, gap=0.0)
            sync_rate = self.sizes.raw_sync / (time.perf_counter() - t0)
            self.progress.update("idle round trips")
            idle = await self._sync_publishes(prefix, self.sizes.idle_samples, gap=_IDLE_GAP)
            self.progress.update(f"pipelining {self.sizes.raw_async:,}")
            async_rate = await self._pipelined(prefix, self.sizes.raw_async)
        finally:
            await conn.jsm.delete_stream(stream)
        rtt, idle_rtt = stats(busy), stats(idle)
        self.progress.end(
            f"round trip p50 {rtt.p50:.2f} ms, p99 {rtt.p99:.2f} ms, idle p50 "
            f"{idle_rtt.p50:.2f} ms; pipelined {async_rate:,.0f} msg/s"
        )
        return Raw(
            publish_rtt_ms=rtt,
            publish_sync_msgs_per_s=sync_rate,
            idle_publish_rtt_ms=idle_rtt,
            pipelined_msgs=self.sizes.raw_async,
            pipelined_msgs_per_s=async_rate,
        )

    async def _sync_publishes(self, prefix: str, count: int, gap: float) -> list[float]:
        """Round trips of ``count`` sync publishes in ms, ``gap`` seconds apart."""
        js = self.client.connection.js
        latencies = []
        for i in range(count):
            if gap:
                await asyncio.sleep(gap)
            t = time.perf_counter()
            await js.publish(f"{prefix}.r{i % 100}", _PAYLOAD)
            latencies.append((time.perf_counter() - t) * 1e3)
        return latencies

    async def _pipelined(self, prefix: str, count: int) -> float:
        """Messages per second of ``count`` pipelined publishes (4,000 in flight)."""
        js = self.client.connection.nc.jetstream(publish_async_max_pending=4000)
        t0 = time.perf_counter()
        for i in range(count):
            await js.publish_async(f"{prefix}.p{i % 1000}", _PAYLOAD)
        await js.publish_async_completed()
        return count / (time.perf_counter() - t0)

    # -- 2. sequential ---------------------------------------------------------------------

    async def sequential(self, raw: Raw) -> Sequential:
        n = self.sizes.steps
        self.progress.begin(f"sequential run of {n} steps")
        run_id = self.run_id("seq")
        async with self.workers("sequential", 1) as procs:
            cpu = self._cpu(procs)
            starts, done, failed, _ = await self._run_many([run_id], n, procs)
            used = cpu.stop()
            rss = procs.peak_rss()[0]
        if failed or run_id not in done:
            raise NatflowError(f"the sequential run {run_id} did not complete")
        gaps = []
        previous: float | None = None
        for event in await self.client.history(run_id):
            if isinstance(event, RunClaimed | StepCompleted):
                at = event.at.timestamp()
                if previous is not None and isinstance(event, StepCompleted):
                    gaps.append((at - previous) * 1e3)
                previous = at
        step = stats(gaps)
        self.progress.end(f"step p50 {step.p50:.2f} ms, p99 {step.p99:.2f} ms")
        return Sequential(
            steps=n,
            step_ms=step,
            p50_over_raw_rtt=step.p50 / raw.publish_rtt_ms.p50,
            run_ms=(done[run_id] - starts[run_id]) * 1e3,
            cpu=used,
            worker_peak_rss_mib=rss,
        )

    # -- 3. throughput ---------------------------------------------------------------------

    async def throughput(self) -> Throughput:
        m, w = self.sizes.runs, self.sizes.workers
        self.progress.begin(
            f"throughput: {m} runs x {_THREE} steps, {w} worker{'s' if w > 1 else ''}, engine"
        )
        ids = [self.run_id(f"tp-{i}") for i in range(m)]
        # As deployed: a `natflow engine` process runs beside the workers (dispatcher, run
        # index, timers), and its CPU counts.
        with engine_process(self._env, self._dir / "engine-throughput.log") as engine:
            await engine_ready(self.client)
            async with self.workers("throughput", w) as procs:
                before = await self._history_messages()
                cpu = CpuWindow(procs.pids, self._server_pid, engine.pid)
                outcome = await self._run_observed(ids, procs)
                # The engine's work for these runs counts in full: the window ends once its
                # dispatcher has taken in every event, not when the last result arrived.
                lag = await self._engine_caught_up()
                used = cpu.stop()
                rss = procs.peak_rss()
                appended = await self._history_messages() - before
        starts, done, failed, started_all = outcome
        t0 = min(starts.values())
        wall = max(max(done.values(), default=t0) - t0, 1e-9)
        latencies = [(done[r] - starts[r]) * 1e3 for r in done]
        rate = len(done) / wall
        per_run = used.ms_per(len(done))
        cost = "" if per_run is None else f", {per_run:.2f} ms CPU/run"
        self.progress.end(f"{rate:,.0f} runs/s, {len(done) * _THREE / wall:,.0f} steps/s{cost}")
        return Throughput(
            runs=m,
            workers=w,
            completed=len(done),
            failed=failed,
            wall_s=wall,
            runs_per_s=rate,
            steps_per_s=len(done) * _THREE / wall,
            history_appends_per_s=appended / wall,
            start_rate_per_s=m / max(started_all - t0, 1e-9),
            start_to_result_ms=stats(latencies),
            cpu=used,
            worker_peak_rss_mib=rss,
            engine_lag_s=lag,
        )

    async def _run_observed(
        self, ids: list[str], procs: WorkerProcesses
    ) -> tuple[dict[str, float], dict[str, float], int, float]:
        """Start every run at once; each ends when its client's ``handle.result()`` returns.

        Returns start times, the times the client saw each result (both this clock), the
        number of failed runs, and when the last start returned.
        """
        starts: dict[str, float] = {}
        started: list[float] = []
        done: dict[str, float] = {}
        failed = 0
        timeout = 60 + len(ids) * _THREE / 50

        async def one(run_id: str) -> None:
            nonlocal failed
            starts[run_id] = time.perf_counter()
            handle = await self.client.start(bench_steps, _THREE, run_id=run_id)
            started.append(time.perf_counter())
            try:
                await handle.result(timeout=timeout)
            except NatflowError:  # a failed or cancelled run: counted, not timed
                failed += 1
                return
            done[run_id] = time.perf_counter()

        async def watch() -> None:
            while True:
                procs.check_alive()
                self.progress.update(f"{len(done):,}/{len(ids):,} done")
                await asyncio.sleep(0.25)

        watcher: asyncio.Future[Any] = asyncio.ensure_future(watch())
        runs: asyncio.Future[Any] = asyncio.gather(*(one(r) for r in ids))
        try:  # a worker that dies ends the phase at once, with its log
            await asyncio.wait([runs, watcher], return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                runs.cancel()
                watcher.result()
            await runs
        finally:
            watcher.cancel()
            runs.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return starts, done, failed, max(started)

    async def _engine_caught_up(self, timeout: float = 30.0) -> float | None:
        """Seconds until the dispatcher has no event of the history stream left unprocessed
        or unacknowledged (None: not within ``timeout``, or a shared server given by
        ``--url``, whose other traffic may never leave it idle: not waited for there)."""
        if self.server is None:
            return None
        t0 = time.perf_counter()
        jsm = self.client.connection.jsm
        while time.perf_counter() - t0 < timeout:
            info = await jsm.consumer_info(HISTORY_STREAM, DISPATCHER)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return time.perf_counter() - t0
            await asyncio.sleep(0.02)
        return None

    async def _history_messages(self) -> int:
        """Messages in the history stream (on a shared server, others' appends count too)."""
        info = await self.client.connection.jsm.stream_info(HISTORY_STREAM)
        return int(info.state.messages)

    async def _run_many(
        self, ids: list[str], steps: int, procs: WorkerProcesses
    ) -> tuple[dict[str, float], dict[str, float], int, float]:
        """Start every run at once and wait for them all to end.

        Returns start times, completion times (the completion event's own timestamp), the
        number of failed runs, and when the last start returned. Ends are seen on one
        subscription to the runs' final events, so the bench client does not receive every
        step event as ``handle.result()`` would.
        """
        wanted = set(ids)
        starts: dict[str, float] = {}
        done: dict[str, float] = {}
        failed: list[str] = []
        finished = asyncio.Event()

        async def on_end(msg: Any) -> None:
            run_id = msg.subject.split(".")[2]
            if run_id not in wanted or event_kind(msg.data) not in ("run_completed", "run_failed"):
                return
            event = decode_event(msg.data)
            if isinstance(event, RunCompleted):
                done[run_id] = event.at.timestamp()
            else:
                failed.append(run_id)
            if len(done) + len(failed) >= len(ids):
                finished.set()

        nc = self.client.connection.nc
        subs = [await nc.subscribe(RUN_LEVEL_FILTER, cb=on_end)]
        await nc.flush()

        async def start(run_id: str) -> None:
            starts[run_id] = time.time()
            await self.client.start(bench_steps, steps, run_id=run_id)

        try:
            await asyncio.gather(*(start(r) for r in ids))
            started_all = time.time()
            deadline = time.monotonic() + 60 + len(ids) * steps / 50
            while not finished.is_set() and time.monotonic() < deadline:
                procs.check_alive()
                self.progress.update(f"{len(done):,}/{len(ids):,} done")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), 0.25)
        finally:
            for sub in subs:
                await sub.unsubscribe()
        return starts, done, len(failed), started_all

    # -- 4. idle start latency -------------------------------------------------------------

    async def start_latency(self) -> StartLatency:
        k = self.sizes.idle_samples
        self.progress.begin(f"idle start latency, {k} runs one at a time")
        begun: dict[str, float] = {}
        results: list[float] = []
        async with self.workers("idle", 1) as procs:
            for i in range(k):
                await asyncio.sleep(_IDLE_GAP)  # let the system go idle again
                self.progress.update(f"{i}/{k}")
                run_id = self.run_id(f"idle-{i}")
                t0 = time.time()
                handle = await self.client.start(bench_steps, 1, run_id=run_id)
                await handle.result(timeout=30)
                results.append((time.time() - t0) * 1e3)
                begun[run_id] = t0
            rss = procs.peak_rss()[0]
        first_steps = []
        for run_id, t0 in begun.items():
            for event in await self.client.history(run_id):
                if isinstance(event, StepCompleted):
                    first_steps.append((event.started_at.timestamp() - t0) * 1e3)
                    break
        first = stats(first_steps)
        self.progress.end(f"start to first step p50 {first.p50:.2f} ms")
        return StartLatency(
            samples=k,
            start_to_first_step_ms=first,
            start_to_result_ms=stats(results),
            worker_peak_rss_mib=rss,
        )

    # -- 5. replay -------------------------------------------------------------------------

    async def replay(self) -> list[Replay]:
        sizes = self.sizes.replay_events
        self.progress.begin(f"replay of {' and '.join(f'{n:,}' for n in sizes)} events")
        found = []
        for events in sizes:
            self.progress.update(f"writing {events:,} events")
            run_id = self.run_id(f"replay-{events}")
            appends = await self._write_history(run_id, events)
            self.progress.update(f"rebuilding {events:,} events")
            times = await self.replay_probe(run_id)
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
        self.progress.end("; ".join(f"{r.events:,} events {r.total_ms:.1f} ms" for r in found))
        return found

    async def _write_history(self, run_id: str, events: int) -> list[float]:
        """A run of ``events`` events through the one write path (conditional appends);
        returns each append's round trip in ms."""
        store = HistoryStore(self.client.connection)
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

    async def replay_probe(self, run_id: str, workflow: str = bench_steps.name) -> ReplayTimes:
        """A fresh process reads and rebuilds the run (``replay_repeat`` times)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "natflow.bench._workflows",
            "replay",
            self.url,
            run_id,
            str(self.sizes.replay_repeat),
            workflow,
            env=self._env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode != 0:
            raise NatflowError(f"the replay probe failed:\n{err.decode(errors='replace')[-2000:]}")
        return msgspec.json.decode(out, type=ReplayTimes)

    # -- cleanup on a server the bench does not own ----------------------------------------

    # -- 6 and 7. with the engine: timers, kill to restart ---------------------------------

    async def waits(self) -> tuple[Timers, KillRestart, ScheduleFires]:
        with engine_process(self._env, self._dir / "engine.log"):
            await engine_ready(self.client)
            self.progress.begin(f"timers: {self.sizes.timers} sleeps of {self.sizes.timer_sleep} s")
            async with self.workers("timers", 1):
                ids = [self.run_id(f"timer-{i}") for i in range(self.sizes.timers)]
                timers = await timer_lateness(self.client, ids, self.sizes.timer_sleep)
            t = timers.lateness_ms
            self.progress.end(f"lateness p50 {t.p50:.1f} ms, p99 {t.p99:.1f} ms")
            self.progress.begin(f"kill to restart, {self.sizes.kill_rounds} rounds")
            kills = [self.run_id(f"kill-{i}") for i in range(self.sizes.kill_rounds)]
            kill = await kill_to_restart(
                self.client,
                self._one_worker,
                self._dir / "marks",
                kills,
                lambda n: pulls_waiting(self.client, n),
            )
            self.progress.end(f"median {kill.restart_ms.p50:.0f} ms")
            seconds = self.sizes.schedule_seconds
            self.progress.begin(f"schedule: every 1 s for {seconds:g} s")
            async with self.workers("schedule", 1):
                fires, run_ids = await schedule_lateness(
                    self.client, f"nb-{self.nonce}-every", seconds
                )
            self.run_ids.extend(run_ids)
            f = fires.lateness_ms
            self.progress.end(f"lateness p50 {f.p50:.1f} ms, p99 {f.p99:.1f} ms")
        return timers, kill, fires

    def _one_worker(self) -> WorkerProcesses:
        n = len(list(self._dir.glob("worker-kill-*.log")))
        procs = WorkerProcesses(
            1, self._env, [self._dir / f"worker-kill-{n}.log"], self.sizes.concurrency
        )
        procs.start()
        return procs

    async def _remove_bench_runs(self) -> None:
        jsm = self.client.connection.jsm
        with _quietly():
            for queue in (BENCH_QUEUE, REPLAY_QUEUE):
                await jsm.purge_stream(TASK_STREAM, subject=f"{TASK_PREFIX}.{queue}.>")
        with _quietly():
            for consumer in await jsm.consumers_info(TASK_STREAM):
                if consumer.name.startswith(queue_consumer(BENCH_QUEUE, "x")[:-1]):
                    await jsm.delete_consumer(TASK_STREAM, consumer.name)
        for run_id in self.run_ids:
            with _quietly():
                await jsm.purge_stream(HISTORY_STREAM, subject=history_subject(run_id))
                await jsm.purge_stream(RUNS_STREAM, subject=runs_subject(run_id))


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # cleanup is best effort; the measurements are done
        log.debug("bench cleanup: %s", exc)
