"""Feed a Prometheus from a realistic natflow: ``natflow dev``, a worker, a few hundred runs.

Starts, on free loopback ports under a scratch directory, ``natflow dev`` (its own nats.conf,
HTTP monitoring on, so the engine exports JetStream usage), ``natflow worker
examples.traffic`` and Debian's ``prometheus`` scraping both with natflow's alert rules. Then
it drives a mix of runs through them: checkouts whose payment step fails now and then
(retries), some rejected orders (failed runs), durable sleeps the engine wakes, approvals
waiting for signals (some never come: a timeout), a few cancellations, and signals for runs
that do not exist (dead letters). With ``--preview`` it draws the overview dashboard from
that Prometheus (``render_preview.py``)::

    python ops/grafana/live_run.py --runs 400 --seconds 300 \\
        --preview docs/dashboard-overview-preview.png

``tests/test_dashboards.py`` uses the same stack and load to check that every dashboard
panel's query returns data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natflow import Client, RunHandle

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus" / "natflow-alerts.yml"
NATFLOW = [sys.executable, "-m", "natflow_engine"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Stack:
    """What :func:`live_stack` started, and where."""

    workdir: Path
    nats_url: str
    engine_port: int
    worker_port: int
    prometheus_url: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def dev_output(self) -> str:
        return (self.workdir / "dev.log").read_text(errors="replace")


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited\n{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready in 60 s\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _metrics_args(port: int, interval: str | None = None) -> list[str]:
    extra = ["--metrics-interval", interval] if interval else []
    return ["--metrics-port", str(port), "--metrics-host", "127.0.0.1", *extra]


@contextlib.contextmanager
def live_stack(
    workdir: Path, *, prometheus: str = "prometheus", scrape_interval: str = "2s"
) -> Iterator[Stack]:
    """natflow dev, a worker of examples.traffic and a Prometheus scraping both."""
    nats, http = free_port(), free_port()
    stack = Stack(workdir, f"nats://127.0.0.1:{nats}", free_port(), free_port(), "")
    conf = workdir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{nats}\nhttp: 127.0.0.1:{http}\n"
        f'jetstream {{ store_dir: "{workdir / "js"}", max_file_store: 10GB }}\n'
    )
    env = {"NATFLOW_URL": stack.nats_url}
    try:
        dev_log = workdir / "dev.log"
        dev = _spawn(
            [*NATFLOW, "dev", "--config", str(conf), *_metrics_args(stack.engine_port, "1")],
            dev_log,
            env,
        )
        stack.procs.append(dev)
        _wait(
            "natflow dev", lambda: "engine dispatcher running" in dev_log.read_text(), dev, dev_log
        )
        worker_log = workdir / "worker.log"
        worker = _spawn(
            [*NATFLOW, "worker", "examples.traffic", *_metrics_args(stack.worker_port)],
            worker_log,
            env,
        )
        stack.procs.append(worker)
        metrics = f"http://127.0.0.1:{stack.worker_port}/metrics"
        _wait("natflow worker", lambda: _answers(metrics), worker, worker_log)
        stack.prometheus_url = _start_prometheus(stack, prometheus, scrape_interval)
        yield stack
    finally:
        for proc in reversed(stack.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start_prometheus(stack: Stack, binary: str, interval: str) -> str:
    config = stack.workdir / "prometheus.yml"
    config.write_text(
        f"global: {{scrape_interval: {interval}, evaluation_interval: {interval}}}\n"
        f"rule_files: ['{RULES}']\n"
        "scrape_configs:\n"
        "  - job_name: natflow-engine\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{stack.engine_port}']}}]\n"
        "  - job_name: natflow-worker\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{stack.worker_port}']}}]\n"
    )
    port = free_port()
    log = stack.workdir / "prometheus.log"
    proc = _spawn(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={stack.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        log,
        {},
    )
    stack.procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    _wait("prometheus", lambda: _answers(f"{url}/-/ready"), proc, log)
    return url


async def drive(url: str, runs: int, seconds: float, seed: int = 19) -> Counter[str]:
    """Start ``runs`` runs spread over ``seconds``, signal and cancel some, wait for them all;
    returns how many ended in each status."""
    rng = random.Random(seed)
    client = await Client.connect(url)
    handles: list[RunHandle] = []
    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(runs):
                handles.append(await _start_one(client, tg, rng, i))
                if i % 50 == 25:  # a signal for a run that does not exist: a dead letter
                    nc = client.connection.nc
                    tg.create_task(_quietly(nc.publish(f"natflow.signal.gone-{i}.x", b"true")))
                await asyncio.sleep(seconds / runs)
        ended: Counter[str] = Counter()
        for handle in handles:
            with contextlib.suppress(Exception):
                await handle.result(timeout=60)
            ended[(await handle.status()).status] += 1
        return ended
    finally:
        await client.close()


async def _start_one(
    client: Client, tg: asyncio.TaskGroup, rng: random.Random, i: int
) -> RunHandle:
    roll = rng.random()
    run_id = f"load-{i}-{rng.getrandbits(32):08x}"
    if roll < 0.7:
        order = {"order": run_id, "reject": roll < 0.04, "settle": rng.uniform(1.1, 2.5)}
        return await client.start("checkout", order, run_id=run_id)
    timeout = 4.0 if roll < 0.72 else 60.0  # some approvals are never decided: a timeout
    handle = await client.start("approval", {"timeout": timeout}, run_id=run_id)
    if roll >= 0.72:
        delay = rng.uniform(0.2, 3.0)
        if roll < 0.75:
            tg.create_task(_later(delay, client.cancel(run_id, "changed their mind")))
        else:
            tg.create_task(_later(delay, client.signal(run_id, "decision", rng.random() < 0.8)))
    return handle


async def _later(delay: float, action: Awaitable[Any]) -> None:
    await asyncio.sleep(delay)
    await _quietly(action)


async def _quietly(action: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):  # a run that ended first: nothing to do
        await action


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=300.0, help="spread the starts")
    parser.add_argument("--preview", default=None, help="draw the overview dashboard here")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="natflow-live-") as scratch,
        live_stack(Path(scratch), prometheus=args.prometheus) as stack,
    ):
        print(stack.dev_output().strip())
        ended = asyncio.run(drive(stack.nats_url, args.runs, args.seconds))
        print(f"runs ended: {dict(ended)}")
        time.sleep(10)  # a few more scrapes after the last run
        if args.preview:
            minutes = max(2, round(args.seconds / 60) + 1)
            subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).parent / "render_preview.py"),
                    "--prometheus",
                    stack.prometheus_url,
                    "--minutes",
                    str(minutes),
                    "--out",
                    args.preview,
                ],
                check=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
