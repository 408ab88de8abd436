"""natflow's alert rules against a real Prometheus (issue 19): each fires under its condition
and stays quiet otherwise.

The rules are loaded from ``ops/prometheus/build_alerts.py`` with short ``for:`` durations and
windows (the shipped thresholds otherwise, except two named below), Prometheus scrapes a real
``natflow engine`` (reading the NATS server's ``/jsz``) and a real worker every second, and
the test makes each condition happen in turn: a timer, a dead-lettered signal, a run on a
queue no worker serves, a JetStream stream and the server's storage nearly full, a worker
and the engine killed.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from natflow import Client
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import send

from tests.helpers import ROOT, spawn_engine, spawn_worker, stop, wait_for
from tests.links import free_port
from tests.test_metrics import Prometheus, prometheus_tools  # noqa: F401 - a fixture

BUILD_ALERTS = ROOT / "ops" / "prometheus" / "build_alerts.py"
WORKER_TARGET = "tests.workflows_metrics:make_worker"
STORE_LIMIT = 4 * 1024 * 1024  # the server's max_file_store: small, so a test can fill it


def build_alerts() -> Any:
    spec = importlib.util.spec_from_file_location("build_alerts", BUILD_ALERTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_alerts"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_shipped_rules_are_what_build_alerts_writes() -> None:
    alerts = build_alerts()
    shipped = (ROOT / "ops" / "prometheus" / "natflow-alerts.yml").read_text()
    assert shipped == alerts.render(), "run python ops/prometheus/build_alerts.py"


def test_shipped_scrape_config_has_no_target_nobody_runs() -> None:
    config = (ROOT / "ops" / "prometheus" / "prometheus.yml").read_text()
    jobs = [line.split(":", 1)[1].strip() for line in config.splitlines() if "job_name:" in line]
    assert jobs == ["natflow-engine", "natflow-worker"]


@pytest.fixture
def nats_with_monitoring(tmp_path: Path) -> Iterator[tuple[EmbeddedServer, int]]:
    """A nats-server with its HTTP monitoring port and a small JetStream file store."""
    http = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        "listen: 127.0.0.1:-1\n"
        f"http: 127.0.0.1:{http}\n"
        f'jetstream {{ store_dir: "{tmp_path / "js"}", max_file_store: {STORE_LIMIT} }}\n'
    )
    server = EmbeddedServer(conf, store_dir=tmp_path / "js")
    server.start()
    try:
        yield server, http
    finally:
        server.stop()


def _start_prometheus(tool: str, tmp_path: Path, engine: int, worker: int) -> Prometheus:
    tuning = build_alerts().Tuning(
        down_for="0s",
        no_worker_for="0s",
        pending_seconds=2,
        pending_for="0s",
        dead_letter_window="1m",
        timer_target_seconds=0,  # any lateness: the engine's own is ~10 ms, never over 1 s here
        timer_window="1m",
        timer_for="0s",
        near_limit_for="0s",
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(build_alerts().render(tuning))
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{rules}']\n"
        "scrape_configs:\n"
        f"  - {{job_name: natflow-engine, static_configs: [{{targets: ['127.0.0.1:{engine}']}}]}}\n"
        f"  - {{job_name: natflow-worker, static_configs: [{{targets: ['127.0.0.1:{worker}']}}]}}\n"
    )
    port = free_port()
    with open(tmp_path / "prometheus.log", "ab") as log:
        proc = subprocess.Popen(
            [
                tool,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return Prometheus(url, proc)
        except OSError:
            pass
        assert time.monotonic() < deadline, "prometheus did not become ready in 30 s"
        time.sleep(0.1)


def _spawn_engine(url: str, metrics: int, monitor: str, log: Path) -> subprocess.Popen[bytes]:
    args = ["--metrics-port", str(metrics), "--metrics-host", "127.0.0.1"]
    args += ["--metrics-interval", "0.5", "--nats-monitor", monitor]
    return spawn_engine(url, *args, log=log)


Active = set[tuple[str, str]]


async def active_alerts(prom: Prometheus) -> Active:
    """(alert name, what it is about) for every alert pending or firing."""
    alerts = (await prom.api("alerts"))["data"]["alerts"]
    about = ("queue", "stream", "job")
    return {
        (a["labels"]["alertname"], next((a["labels"][k] for k in about if k in a["labels"]), ""))
        for a in alerts
        if a["state"] in ("pending", "firing")
    }


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_each_alert_fires_under_its_condition_and_stays_quiet_otherwise(
    nats_with_monitoring: tuple[EmbeddedServer, int],
    prometheus_tools: tuple[str, str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    server, http = nats_with_monitoring
    engine_port, worker_port = free_port(), free_port()
    prom = _start_prometheus(prometheus_tools[0], tmp_path, engine_port, worker_port)
    engine = _spawn_engine(server.url, engine_port, f"http://127.0.0.1:{http}", tmp_path / "e.log")
    worker = spawn_worker(
        server.url,
        WORKER_TARGET,
        "--metrics-port",
        str(worker_port),
        "--metrics-host",
        "127.0.0.1",
        log=tmp_path / "worker.log",
    )
    client = await Client.connect(server.url)
    try:

        async def healthy() -> bool:
            assert engine.poll() is None and worker.poll() is None, "a process exited"
            if not await list_workers(client.connection):
                return False
            return (
                await prom.value('sum(up{job=~"natflow-.*"})') == 2
                and await prom.value("count(natflow_jetstream_stream_messages)") >= 5
                and await prom.value("count(natflow_queue_oldest_pending_run_seconds)") >= 1
            )

        await wait_for(healthy, timeout=40, what="engine, worker and /jsz scraped")
        await anyio.sleep(3)  # a few evaluations of every rule on healthy data
        assert await active_alerts(prom) == set(), "alerts active while all is well"

        # A timer fired by the engine (a sleep over a second: the worker lets the run go).
        nap = await client.start("napper", 1.2, run_id="nap-1")
        # A signal for a run that does not exist: dead-lettered.
        await send(client.connection, "no-such-run", "poke", b"1", None)
        # A run on a queue that no worker serves: pending, with no live worker.
        await client.start("napper", 1.0, run_id="orphan-1", queue="orphan")
        # A stream at its max_msgs, filling most of the server's max_file_store.
        js = client.connection.js
        await js.add_stream(name="SCRATCH", subjects=["scratch.>"], max_msgs=20)
        for _ in range(20):
            await js.publish("scratch.fill", b"x" * (STORE_LIMIT // 21))
        # One at its max_msgs far below its max_bytes: the alert looks at either limit.
        await js.add_stream(name="FEW", subjects=["few.>"], max_msgs=5, max_bytes=64 * 1024)
        for _ in range(5):
            await js.publish("few.fill", b"y")
        assert await nap.result(timeout=20) == "rested"

        expected = {
            ("NatflowTimersLate", ""),
            ("NatflowDeadLettersGrowing", ""),
            ("NatflowNoLiveWorkers", "orphan"),
            ("NatflowRunsPendingTooLong", "orphan"),
            ("NatflowJetStreamStreamNearLimit", "SCRATCH"),
            ("NatflowJetStreamStreamNearLimit", "FEW"),
            ("NatflowJetStreamStorageNearLimit", ""),
        }

        async def all_fired() -> Active:
            active = await active_alerts(prom)
            return active if expected <= active else set()

        active = await wait_for(all_fired, timeout=30, what="the seven alerts active")
        await anyio.sleep(2)  # and nothing else, a couple of evaluations later
        assert await active_alerts(prom) == expected

        # The worker and then the engine die: their targets go down.
        stop(worker, signal.SIGKILL)
        stop(engine, signal.SIGKILL)

        async def down() -> Active:
            active = await active_alerts(prom)
            wanted = {
                ("NatflowWorkerDown", "natflow-worker"),
                ("NatflowEngineDown", "natflow-engine"),
            }
            return active if wanted <= active else set()

        active = await wait_for(down, timeout=20, what="the target-down alerts active")
        assert {name for name, _ in active} <= {a for a, _ in expected} | {
            "NatflowWorkerDown",
            "NatflowEngineDown",
        }
    finally:
        await client.close()
        stop(worker)
        stop(engine)
        prom.proc.terminate()
        prom.proc.wait(timeout=10)
