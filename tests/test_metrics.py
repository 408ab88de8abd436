"""Metrics checked against a real Prometheus (issue 6).

Debian's ``prometheus`` package (``make system-deps`` installs it, as the first step of
``make test``; missing, these tests fail saying so) scrapes a real engine
and two real worker processes every second while runs execute: a run that fails, a takeover
after SIGKILL of a worker, a late timer, signals good and bad, a blocked run. Then its HTTP API
shows that every metric natflow defines has samples, that each of those events moved its
metric, that every query of every shipped dashboard returns data, and that every shipped alert
rule evaluates (the blocked run's alert becomes active); and, read through the metrics, that
runs that ended leave no timer behind. ``promtool`` checks the shipped configuration and rules.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from natflow import Client
from natflow_engine import RunFailed
from natflow_engine._logs import JsonFormatter, fields
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import send
from natflow_engine.events import TimerScheduled
from prometheus_client import REGISTRY

from tests.helpers import ROOT, spawn_worker, stop, wait_for
from tests.links import free_port
from tests.workflows_metrics import FLIP_ENV, GATE_ENV

TARGET = "tests.workflows_metrics:make_worker"
OPS = ROOT / "ops"
RULES = OPS / "prometheus" / "natflow-alerts.yml"
DASHBOARDS = sorted((OPS / "grafana" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$workflow": ".*", "$queue": ".*", "$step": ".*", "$__rate_interval": "30s"}


# -- Prometheus ------------------------------------------------------------------------------


def _installed() -> tuple[str, str] | None:
    found = shutil.which("prometheus"), shutil.which("promtool")
    return (found[0], found[1]) if found[0] and found[1] else None


@pytest.fixture(scope="module")
def prometheus_tools() -> tuple[str, str]:
    """Debian's prometheus and promtool. `make test` installs them first (`make system-deps`,
    a visible step); this suite installs nothing, and fails when they are missing."""
    tools = _installed()
    if tools is None:
        pytest.fail(
            "prometheus and promtool are not on PATH: run `make system-deps` (it installs "
            "Debian's prometheus package; `make test` runs it first)",
            pytrace=False,
        )
    return tools


def _get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # a query that does not parse is a 400 with JSON
        body = json.loads(exc.read())
    return body


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        return await anyio.to_thread.run_sync(_get, url)

    async def query(self, expr: str) -> list[dict[str, Any]]:
        body = await self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, expr: str) -> float:
        """The query's single value (0 when it returns nothing)."""
        result = await self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else 0.0

    async def until(self, expr: str, check: Callable[[float], bool], what: str) -> float:
        async def met() -> list[float]:
            value = await self.value(expr)
            return [value] if check(value) else []  # a list: 0.0 may be the awaited value

        return (await wait_for(met, timeout=20, what=f"{what} ({expr})"))[0]


def _scrape_config(engine_port: int, worker_ports: list[int]) -> str:
    def job(name: str, ports: list[int]) -> str:
        targets = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
        return f"  - job_name: {name}\n    static_configs:\n      - targets: [{targets}]\n"

    return (
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        "scrape_configs:\n"
        + job("natflow-engine", [engine_port])
        + job("natflow-worker", worker_ports)
    )


@pytest.fixture
def prometheus_factory(
    prometheus_tools: tuple[str, str], tmp_path: Path
) -> Iterator[Callable[[int, list[int]], Prometheus]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(engine_port: int, worker_ports: list[int]) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(_scrape_config(engine_port, worker_ports))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                prometheus_tools[0],
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(proc)
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

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- the engine, as `natflow engine` ------------------------------------------------------------


def spawn_engine(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`natflow --log-json engine`, serving metrics on ``port`` and polling JetStream often."""
    env = {**os.environ, "NATFLOW_URL": url, "PYTHONPATH": str(ROOT)}
    args = ["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--metrics-interval", "0.5"]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "natflow_engine", "--log-json", "engine", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def start_engine(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start the engine and return once its dispatcher runs."""
    path = anyio.Path(log)
    offset = len(await path.read_text()) if await path.exists() else 0
    proc = spawn_engine(url, port, log)

    async def dispatching() -> bool:
        text = await path.read_text()
        assert proc.poll() is None, text[-3000:]
        return "engine dispatcher running" in text[offset:]

    await wait_for(dispatching, timeout=20, what="the engine dispatching")
    return proc


# -- what the shipped files ask of Prometheus ----------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and template variable of every dashboard."""
    found: list[tuple[str, str]] = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                metric, label = re.fullmatch(
                    r"label_values\((.+), (\w+)\)", var["definition"]
                ).groups()  # type: ignore[union-attr]
                found.append((f"{path.name}: ${var['name']}", f"group by ({label}) ({metric})"))
    return [(where, _substitute(expr)) for where, expr in found]


def _substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unhandled Grafana variable in {expr}"
    return expr


def natflow_series_names() -> list[str]:
    """The sample name Prometheus stores for every metric natflow defines."""
    suffix = {"counter": "_total", "histogram": "_count"}
    return sorted(
        family.name + suffix.get(family.type, "")
        for family in REGISTRY.collect()
        if family.name.startswith("natflow_") and not needs_jsz(family.name)
    )


def needs_jsz(text: str) -> bool:
    """JetStream usage comes from nats-server's /jsz, which this test's server does not
    serve: tests/test_alerts.py and tests/test_dashboards.py check those metrics."""
    return "natflow_jetstream_" in text


def test_shipped_prometheus_config_and_rules_pass_promtool(
    prometheus_tools: tuple[str, str],
) -> None:
    promtool = prometheus_tools[1]
    for args in (
        ["check", "config", str(OPS / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(RULES)],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_json_log_lines_carry_the_run_fields() -> None:
    record = logging.LogRecord(
        "natflow.worker",
        logging.WARNING,
        __file__,
        1,
        "run %s: step %r failed",
        ("r-1", "charge"),
        None,
    )
    record.__dict__.update(fields("r-1", "order", "charge", attempt=2))
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "run r-1: step 'charge' failed"
    assert (line["run_id"], line["workflow"], line["step"], line["attempt"]) == (
        "r-1",
        "order",
        "charge",
        2,
    )
    assert line["level"] == "WARNING" and line["logger"] == "natflow.worker"


# -- the scenario ----------------------------------------------------------------------------------


def at_least_(n: float) -> Callable[[float], bool]:
    return lambda value: value >= n


@pytest.mark.timeout(300)
async def test_prometheus_sees_every_metric_and_every_shipped_query_works(
    client: Client,
    nats_server: EmbeddedServer,
    prometheus_factory: Callable[[int, list[int]], Prometheus],
    tmp_path: Path,
) -> None:
    engine_port, port_a, port_b = free_port(), free_port(), free_port()
    prom = prometheus_factory(engine_port, [port_a, port_b])
    gates, flip = tmp_path / "gates", tmp_path / "flipped"
    gates.mkdir()
    env = {GATE_ENV: str(gates), FLIP_ENV: str(flip), "NATFLOW_LOG_JSON": "1"}

    def worker(port: int, name: str) -> subprocess.Popen[bytes]:
        args = ("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
        return spawn_worker(nats_server.url, TARGET, *args, env=env, log=tmp_path / name)

    async def registered(proc: subprocess.Popen[bytes]) -> bool:
        assert proc.poll() is None, "a worker process exited"
        return any(w.pid == proc.pid for w in await list_workers(client.connection))

    engine_log = tmp_path / "engine.log"
    engine = await start_engine(nats_server.url, engine_port, engine_log)
    worker_a = worker(port_a, "worker-a.log")
    worker_b: subprocess.Popen[bytes] | None = None
    try:
        await wait_for(lambda: registered(worker_a), timeout=20, what="worker A registered")

        # -- a takeover after SIGKILL ---------------------------------------------------------
        held = await client.start("held", run_id="held-1")

        async def holding() -> bool:
            return ("hold", "running") in [(s.name, s.status) for s in await client.steps("held-1")]

        await wait_for(holding, timeout=20, what="worker A inside step 'hold'")
        worker_b = worker(port_b, "worker-b.log")
        await wait_for(lambda: registered(worker_b), timeout=20, what="worker B registered")
        # Both takeover counters exist at zero (engine: reaped, worker: redelivered).
        await prom.until("count(natflow_lease_takeovers_total)", at_least_(2), "zeros")
        assert await prom.value("sum(natflow_lease_takeovers_total)") == 0
        stop(worker_a, signal.SIGKILL)
        (gates / "held-1").touch()
        assert await held.result(timeout=20) == "opened"
        await prom.until('sum(natflow_lease_takeovers_total{kind="reaped"})', at_least_(1), "")
        await prom.until('sum(natflow_lease_takeovers_total{kind="redelivered"})', at_least_(1), "")

        # -- a run that fails -----------------------------------------------------------------
        failed = 'sum(natflow_runs_closed_total{status="failed"})'
        await prom.until('count(natflow_runs_closed_total{status="failed"})', at_least_(1), "")
        assert await prom.value(failed) == 0
        doomed = await client.start("doomed", 7, run_id="doomed-1")
        with pytest.raises(RunFailed, match="cannot handle 7"):
            await doomed.result(timeout=20)
        await prom.until(failed, lambda v: v == 1, "the failed run counted")
        await prom.until(
            'sum(natflow_steps_total{workflow="doomed",step="boom",outcome="failed"})',
            lambda v: v == 1,
            "the failed step counted",
        )

        # -- retries, signals good and bad, a blocked run -------------------------------------
        assert await (await client.start("metered", 4, run_id="metered-1")).result(20) == 8
        approval = await client.start("approval", run_id="approval-1")
        drift = await client.start("drifting", run_id="drift-1")

        async def waiting(run_id: str) -> bool:
            return (await client.describe(run_id)).status == "waiting"

        await wait_for(lambda: waiting("approval-1"), what="approval waiting")
        await wait_for(lambda: waiting("drift-1"), what="drift waiting")
        await client.signal("approval-1", "decision", "yes")
        assert await approval.result(timeout=20) == "YES"
        await client.start("approval", run_id="approval-2")
        await wait_for(lambda: waiting("approval-2"), what="approval-2 waiting")
        await client.cancel("approval-2", "nobody decided")
        await send(client.connection, "ghost-run", "poke", b"1", None)  # no such run
        flip.touch()  # "deploy" code that renames the first step of drifting
        await client.signal(drift.run_id, "go", 1)

        async def blocked() -> bool:
            return (await client.describe("drift-1")).status == "blocked"

        await wait_for(blocked, timeout=20, what="the drifting run blocked")

        # -- every metric natflow defines has samples, and these moved ------------------------
        for expr, least in (
            ('max(natflow_runs{workflow="drifting",status="blocked"})', 1),
            ('sum(natflow_signals_rejected_total{by="engine"})', 1),
            ('sum(natflow_step_retries_total{workflow="metered",step="flaky"})', 1),
            ('sum(natflow_signals_received_total{workflow="approval"})', 1),
            ('sum(natflow_signals_delivered_total{workflow="approval"})', 1),
            ('sum(natflow_nondeterminism_errors_total{workflow="drifting"})', 1),
            ('sum(natflow_runs_started_total{workflow="metered"})', 1),
            ('sum(natflow_runs_closed_total{workflow="approval",status="cancelled"})', 1),
            ('sum(natflow_run_duration_seconds_count{workflow="metered"})', 1),
            ('sum(natflow_step_duration_seconds_count{workflow="metered",step="flaky"})', 2),
            ('sum(natflow_task_schedule_to_start_seconds_count{queue="default"})', 1),
            ('max(natflow_workers_live{queue="default"})', 1),
        ):
            await prom.until(expr, at_least_(least), "a moved metric")
        missing = [
            name
            for name in natflow_series_names()
            if not await prom.query(f'count({{__name__="{name}"}})')
        ]
        assert not missing, f"no samples in Prometheus for {missing}"

        # -- every dashboard query returns data, every alert rule evaluates -------------------
        await anyio.sleep(2.5)  # two more scrapes: rate() and increase() need two samples
        empty = [
            f"{where}: {expr}"
            for where, expr in dashboard_queries()
            if not needs_jsz(expr) and not await prom.query(expr)
        ]
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        async def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = (await prom.api("rules"))["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            done = rules and all(r.get("lastEvaluation", "").startswith("2") for r in rules)
            return rules if done else None

        rules = await wait_for(rules_evaluated, what="the alert rules evaluated")
        assert rules is not None and len(rules) == RULES.read_text().count("- alert: ")
        for rule in rules:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
            await prom.query(rule["query"])  # parses and runs

        async def blocked_alert() -> bool:
            alerts = (await prom.api("alerts"))["data"]["alerts"]
            return any(
                a["labels"]["alertname"] == "NatflowRunsBlocked"
                and a["labels"].get("workflow") == "drifting"
                for a in alerts
            )

        await wait_for(blocked_alert, what="the blocked-run alert active")

        # -- a late timer: the engine is down when it comes due -------------------------------
        late = (
            "sum(natflow_timer_lateness_seconds_count)"
            ' - sum(natflow_timer_lateness_seconds_bucket{le="1.0"})'
        )
        assert await prom.value(late) == 0
        stop(engine, signal.SIGTERM)
        napper = await client.start("napper", 2.0, run_id="napper-1")

        async def scheduled() -> TimerScheduled | None:
            events = await client.history("napper-1")
            return next((e for e in events if isinstance(e, TimerScheduled)), None)

        timer = await wait_for(scheduled, what="the nap scheduled")
        assert timer is not None
        await anyio.sleep((timer.due_at - datetime.now(UTC)).total_seconds() + 1.5)
        engine = await start_engine(nats_server.url, engine_port, engine_log)
        assert await napper.result(timeout=20) == "rested"
        await prom.until(late, at_least_(1), "a timer woken more than 1 s late")
        # Runs that ended leave no timer behind (approval's timeout was never needed).
        await prom.until("max(natflow_timers_pending)", lambda v: v == 0, "no timers left")

        # -- structured logs: JSON lines that name the run ------------------------------------
        def json_lines(name: str) -> list[dict[str, Any]]:
            text = (tmp_path / name).read_text()
            return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

        takeover = [e for e in json_lines("worker-b.log") if "taken over from" in e["msg"]]
        assert [(e["run_id"], e["workflow"]) for e in takeover] == [("held-1", "held")]
        reaped = [e for e in json_lines("engine.log") if "handed back from worker" in e["msg"]]
        assert [e["run_id"] for e in reaped] == ["held-1"]
        late_lines = [e for e in json_lines("engine.log") if "late" in e["msg"]]
        assert [e["run_id"] for e in late_lines] == ["napper-1"]
    finally:
        stop(engine, signal.SIGKILL)
        stop(worker_a)
        if worker_b is not None:
            stop(worker_b)


def test_a_pending_run_waits_since_it_became_pending_not_since_it_was_created() -> None:
    """natflow_queue_oldest_pending_run_seconds took every pending run's age from its
    creation: a run that slept a day and was due a moment ago counted a day (the
    pending-too-long alert fired for a run that had waited seconds)."""
    from natflow_engine._engine_metrics import pending_since
    from natflow_engine._state import RunInfo

    created = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)
    due = created + timedelta(days=1)
    woke = RunInfo(
        run_id="r", workflow="w", queue="q", status="pending", created_at=created,
        updated_at=due, due_at=due,
        current=f"timer 'nap' due since {due.isoformat()}, waiting for a worker",
    )  # fmt: skip
    assert pending_since(woke) == due
    parked = msgspec.structs.replace(woke, due_at=None, current="waiting for a slot")
    assert pending_since(parked) == due  # its last change: when it began to wait
    fresh = msgspec.structs.replace(parked, updated_at=created, current=None)
    assert pending_since(fresh) == created
    assert pending_since(msgspec.structs.replace(fresh, status="running")) is None
    delayed = msgspec.structs.replace(fresh, current="starts at 2026-11-27 05:00:00 UTC")
    assert pending_since(delayed) == created + timedelta(hours=1)  # as _state writes it


def test_a_taken_metrics_port_is_a_warning_that_names_the_option(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It said only "cannot listen": nothing on how to pick another."""
    from natflow_engine._metrics import serve_metrics

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with caplog.at_level(logging.WARNING, logger="natflow"):
            assert serve_metrics(held.getsockname()[1]) is None
    assert "--metrics-port" in caplog.text, caplog.text
