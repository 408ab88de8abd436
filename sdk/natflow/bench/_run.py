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

This module holds the command and the order of the phases; each phase has a module of its
own (``_raw``, ``_sequential``, ``_throughput``, ``_start_latency``, ``_replay``,
``_engine_phases``, ``_continue``), ``_session`` what they share, ``_report`` the report and
its targets, and ``_table`` the table printed from it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from natflow_engine import EmbeddedServer, InvalidInput, default_url, shipped_server

from . import _engine_phases, _raw, _replay, _sequential, _start_latency, _throughput
from ._cleanup import remove_bench_runs
from ._continue import continue_loop
from ._procs import Progress
from ._report import (
    BenchReport,
    KillRestart,
    Raw,
    Replay,
    ScheduleFires,
    Sequential,
    StartLatency,
    Throughput,
    Timers,
    evaluate,
)
from ._scale import ScaleReport, point, render_scale
from ._session import BenchSession
from ._sizes import Sizes, sizes_from
from ._table import render

PENDING: dict[str, str] = {}


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
        "--workers",
        type=int,
        default=None,
        help="worker processes in the throughput phase (default: one per core, as `natflow "
        "worker` runs; 1 with --quick)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="client processes that start and await the throughput phase's runs (1: the "
        "bench's own)",
    )
    p.add_argument(
        "--engines",
        type=int,
        default=None,
        help="`natflow engine` processes beside the throughput phase's workers (1)",
    )
    p.add_argument(
        "--scale",
        default=None,
        metavar="W,W,...",
        help="scale-out: only the raw and throughput phases, once per worker count "
        "(e.g. 1,4,8,16), with --runs runs each; reports where the curve bends",
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


async def run_bench_command(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    if args.log_level.upper() == "INFO":  # the default: keep stderr for the progress lines
        logging.getLogger("natflow").setLevel(logging.WARNING)
    url: str | None = args.bench_url
    if url is None and args.url != default_url():  # `natflow --url URL bench`
        url = args.url
    if url is None and args.bench_monitor is not None:
        # The embedded server's own monitoring is what tells its durability and counts its
        # messages; another server's would be reported as this one's.
        raise InvalidInput(
            "--monitor is only for a server given with --url; the embedded server's own "
            "monitoring is read without it"
        )
    monitor: str | None = args.bench_monitor
    if monitor is not None and not monitor.startswith(("http://", "https://")):
        raise InvalidInput(
            f"--monitor {monitor!r}: not the URL of the server's HTTP monitoring "
            "(e.g. http://127.0.0.1:8222)"
        )
    with _terminate_as_interrupt() as terminated:
        try:
            report = await _measure(args, url, sizes)
        except asyncio.CancelledError:
            if not terminated:
                raise
            return 128 + signal.SIGTERM
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode())
        sys.stdout.write("\n")
    else:
        print(render_scale(report) if isinstance(report, ScaleReport) else render(report))
    return 0


async def _measure(
    args: argparse.Namespace, url: str | None, sizes: Sizes
) -> BenchReport | ScaleReport:
    if url is not None:
        bench = Bench(url, args, sizes, None)
        return await (bench.run_scale() if sizes.scale else bench.run())
    server: EmbeddedServer | None = None
    with _without_deployment(args) as embedded:
        store = Path(tempfile.mkdtemp(prefix="natflow-bench-js-"))
        try:  # as shipped: natflow's own configuration (durable unless --fast)
            server = shipped_server(store, fast=args.fast).start()
            bench = Bench(server.url, embedded, sizes, server)
            return await (bench.run_scale() if sizes.scale else bench.run())
        finally:
            if server is not None:
                server.cleanup()
            shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[list[int]]:
    """SIGTERM cancels the bench's task, as asyncio does on SIGINT: its ``finally`` then
    stops its processes and names the logs it leaves with the event loop and the connection
    still whole. (``natflow``'s own SIGTERM handler raises SystemExit wherever the loop
    happens to be, a task of nats-py's included, and the bench's task is only cancelled once
    the loop is being torn down.) Yields a list that holds the signal once it came."""
    terminated: list[int] = []
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    before = signal.getsignal(signal.SIGTERM)

    def cancel() -> None:
        terminated.append(signal.SIGTERM)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, cancel)
    except (RuntimeError, ValueError, NotImplementedError):  # off the main thread, or Windows
        yield terminated
        return
    try:
        yield terminated
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if before is not None:  # natflow's own, for the report's printing
            signal.signal(signal.SIGTERM, before)
        if terminated and task is not None:
            task.uncancel()


# What points natflow at a deployment: its JetStream domain, its streams' replicas, and how
# to log in to it. The embedded server has none of them, and the bench reads them from the
# environment in this process and in every process it starts.
_DEPLOYMENT_VARIABLES = (
    "NATFLOW_REPLICAS",
    "NATFLOW_DOMAIN",
    "NATFLOW_USER",
    "NATFLOW_PASSWORD",
    "NATFLOW_TOKEN",
    "NATFLOW_NKEY",
    "NATFLOW_CREDS",
)
_CREDENTIAL_OPTIONS: tuple[str, ...] = ("creds", "nkey", "user", "password", "token")
_CREDENTIAL_OPTIONS += ("tls_ca", "tls_cert", "tls_key")


@contextlib.contextmanager
def _without_deployment(args: argparse.Namespace) -> Iterator[argparse.Namespace]:
    """``args`` without credentials, and this process's environment without
    ``_DEPLOYMENT_VARIABLES`` and ``NATFLOW_TLS_*``, for as long as the embedded bench runs."""
    names = [n for n in os.environ if n in _DEPLOYMENT_VARIABLES or n.startswith("NATFLOW_TLS_")]
    if names:
        print(
            f"natflow bench: the embedded server runs without {', '.join(sorted(names))} "
            "(they are for a server given with --url)",
            file=sys.stderr,
        )
    saved = {name: os.environ.pop(name) for name in names}
    try:
        yield argparse.Namespace(**{**vars(args), **dict.fromkeys(_CREDENTIAL_OPTIONS)})
    finally:
        os.environ.update(saved)


# -- the bench ---------------------------------------------------------------------------


class Bench(BenchSession):
    """Runs every phase against one server and assembles the :class:`BenchReport`.

    Each phase is a method, so a harness can run one phase alone on a connected bench.
    """

    async def run(self) -> BenchReport:
        t0 = time.perf_counter()
        ok = False
        try:
            await self.connect()
            raw = await self.raw_baseline()
            sequential = await self.sequential(raw)
            throughput = await self.throughput()
            idle = await self.start_latency()
            replay = await self.replay()
            timers, kill, fires = await self.waits()
            loop = await continue_loop(self)
            ok = True
        finally:
            await self._finish(ok)
        report = BenchReport(
            environment=self.environment(),
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

    async def run_scale(self) -> ScaleReport:
        """``--scale``: the raw baseline, then the throughput phase once per worker count."""
        t0 = time.perf_counter()
        self.progress = Progress(1 + len(self.sizes.scale))
        ok = False
        try:
            await self.connect()
            raw = await self.raw_baseline()
            points = [point(await self.throughput(w)) for w in self.sizes.scale]
            ok = True
        finally:
            await self._finish(ok)
        return ScaleReport(
            environment=self.environment(),
            elapsed_s=time.perf_counter() - t0,
            raw=raw,
            points=points,
        )

    async def _finish(self, ok: bool) -> None:
        try:
            if self.connected:
                if self.server is None:
                    await remove_bench_runs(self)
                await self.client.close()
        finally:
            # A bench that failed before it wrote any log (no server, no JetStream) leaves
            # nothing behind; one that wrote some says where they are.
            if ok or not self._wrote_logs():
                shutil.rmtree(self.dir, ignore_errors=True)
            else:
                print(f"natflow bench: worker logs are in {self.dir}", file=sys.stderr)

    def _wrote_logs(self) -> bool:
        try:
            return any(self.dir.iterdir())
        except OSError:  # gone already
            return False

    async def raw_baseline(self) -> Raw:
        """Phase 1 (``_raw``)."""
        return await _raw.raw_baseline(self)

    async def sequential(self, raw: Raw) -> Sequential:
        """Phase 2 (``_sequential``)."""
        return await _sequential.sequential(self, raw)

    async def throughput(self, workers: int | None = None) -> Throughput:
        """Phase 3 (``_throughput``), with ``workers`` processes (default ``--workers``)."""
        return await _throughput.throughput(self, workers)

    async def start_latency(self) -> StartLatency:
        """Phase 4 (``_start_latency``)."""
        return await _start_latency.start_latency(self)

    async def replay(self) -> list[Replay]:
        """Phase 5 (``_replay``)."""
        return await _replay.replay(self)

    async def waits(self) -> tuple[Timers, KillRestart, ScheduleFires]:
        """Phases 6 to 8, with an engine process (``_engine_phases``)."""
        return await _engine_phases.waits(self)
