"""`natflow bench --quick --json` runs end to end and reports every figure (no thresholds)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from natflow import Client
from natflow.bench._procs import CpuWindow, cpu_seconds
from natflow.bench._report import MIN_MACHINE_WINDOW
from natflow.bench._schedules import schedule_lateness
from natflow.bench._workflows import bench_steps
from natflow_engine import HISTORY_PREFIX, HISTORY_STREAM, EmbeddedServer, NatflowError, read_jsz
from natflow_engine._server import nats_server_binary

from tests.helpers import running_worker
from tests.procs import gone, kill_all
from tests.test_worker_processes import children_of

ROOT = Path(__file__).resolve().parent.parent


def natflow_command() -> list[str]:
    script = Path(sys.executable).parent / "natflow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "natflow_engine"]


def run_bench(
    *args: str, timeout: float = 200, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``natflow bench ARGS`` from the repository root, its output captured as text, with
    ``env`` added to this process's environment."""
    return subprocess.run(
        [*natflow_command(), "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_stats(value: Any, *, count: int | None = None) -> None:
    assert set(value) == {"count", "p50", "p99", "max", "mean"}
    assert value["count"] >= 1 if count is None else value["count"] == count
    assert 0 < value["p50"] <= value["p99"] <= value["max"]


def assert_number(value: Any) -> None:
    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, value


def test_quick_bench_reports_every_figure_as_json() -> None:
    done = run_bench("--quick", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert "[5/9] replay" in done.stderr  # the progress lines went to stderr, not stdout

    assert report["version"] == 1 and report["quick"] is True
    assert report["environment"]["embedded"] is True
    assert report["environment"]["server_version"] != "?"
    # as shipped: the embedded server is natflow's durable configuration, read from /jsz
    assert report["environment"]["durability"].startswith("fsync before every ack")
    # the bench runs on the loop its workers, engine and clients run on: uvloop, installed
    assert report["environment"]["event_loop"].startswith("uvloop ")

    raw = report["raw"]
    assert_stats(raw["publish_rtt_ms"])
    assert_stats(raw["idle_publish_rtt_ms"])
    for key in ("publish_sync_msgs_per_s", "pipelined_msgs", "pipelined_msgs_per_s"):
        assert_number(raw[key])

    seq = report["sequential"]
    assert_stats(seq["step_ms"], count=seq["steps"])
    for key in ("p50_over_raw_rtt", "run_ms", "worker_peak_rss_mib"):
        assert_number(seq[key])
    assert seq["cpu"]["client"] >= 0 and seq["cpu"]["workers"] is not None

    tp = report["throughput"]
    assert tp["completed"] == tp["runs"] and tp["failed"] == 0 and tp["workers"] == 1
    assert_stats(tp["start_to_result_ms"], count=tp["runs"])
    for key in ("runs_per_s", "steps_per_s", "history_appends_per_s", "start_rate_per_s"):
        assert_number(tp[key])
    assert len(tp["worker_peak_rss_mib"]) == 1
    assert tp["cpu"]["engine"] is not None  # the engine ran beside the workers, as deployed
    assert_number(tp["worker_peak_rss_mib"][0])
    # Counted by the embedded server: a 3-step run is at least its 5 appends and their acks.
    assert tp["server_msgs_per_run"] >= 10

    idle = report["start_latency"]
    assert_stats(idle["start_to_first_step_ms"], count=idle["samples"])
    assert_stats(idle["start_to_result_ms"], count=idle["samples"])
    assert_stats(idle["start_call_ms"], count=idle["samples"])
    assert_number(idle["worker_peak_rss_mib"])

    assert [r["events"] for r in report["replay"]] == [100, 1000]
    for replay in report["replay"]:
        for key in ("read_ms", "rebuild_ms", "total_ms", "cold_ms", "peak_rss_mib"):
            assert_number(replay[key])
        assert_stats(replay["append_ms"], count=replay["events"] - 2)

    timers = report["timers"]
    assert timers["fired_once"] is True and timers["early"] == 0
    assert_stats(timers["lateness_ms"], count=timers["count"])
    fires = report["schedules"]
    assert fires["exactly_once"] is True and fires["early"] == 0
    assert fires["fires"] >= 3 and fires["runs"] == fires["fires"]
    assert_stats(fires["lateness_ms"], count=fires["runs"])
    kill = report["kill_to_restart"]
    assert_stats(kill["restart_ms"], count=kill["rounds"])

    loop = report["continue_as_new"]
    assert loop["steps"] == 2500 and loop["stretches"] == 3  # 1,000 commands a stretch
    assert loop["kill_steps"] == 3000 and loop["killed_at_stretch"] >= 1
    for key in ("wall_s", "steps_per_s", "replay_ms", "replay_cold_ms", "resumed_s"):
        assert_number(loop[key])
    assert 0 < loop["stretch_events_at_kill"] <= 1100  # one stretch, not the whole loop

    assert report["pending"] == {}
    names = [t["name"] for t in report["targets"]]
    assert names == [
        "sequential step p50",
        "sequential step p99",
        "throughput, runs/s of 3 steps",
        "throughput, cpu per run",
        "idle start to first step p50",
        "replay of 10,000 events",
        "timer wake-up lateness p99",
        "kill to restart elsewhere, median",
        "replay after a kill mid-loop (continue-as-new)",
    ]
    by_name = {t["name"]: t for t in report["targets"]}
    assert by_name["replay of 10,000 events"]["met"] is None  # --quick replays 1,000 at most
    # Evaluated on every run, CPU per run too: each process's CPU clock counts in ns.
    always = ("sequential step p50", "sequential step p99", "throughput, runs/s of 3 steps")
    always += ("throughput, cpu per run", "idle start to first step p50")
    assert by_name["throughput, cpu per run"]["measured"] > 0
    assert all(isinstance(by_name[name]["met"], bool) for name in always)


BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.1: pass\ninput()"


def test_a_process_cpu_is_read_to_the_millisecond_not_in_10_ms_ticks() -> None:
    """A phase shorter than a second still gets a true CPU figure (issue 20's CPU per run)."""
    burner = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE)
    try:
        window = CpuWindow([burner.pid], server=None)
        deadline = time.monotonic() + 30
        while (used := cpu_seconds(burner.pid)) is not None and used < 0.1:
            assert time.monotonic() < deadline, f"the burner used {used} s of CPU in 30 s"
            time.sleep(0.01)  # polling its CPU clock: there is no event to wait on
        cpu = window.stop()
        assert used is not None
        assert abs(used * 100 - round(used * 100)) > 1e-6  # not a whole number of 10 ms ticks
        assert cpu.workers is not None
        burnt = cpu.workers / 100 * cpu.window_s
        assert 0.08 < burnt < 0.5  # the interpreter's start-up falls in the window too
        if cpu.window_s < MIN_MACHINE_WINDOW:  # (a busy machine may stretch the window)
            assert cpu.other is None  # the machine's total counts in ticks: too rough
    finally:
        burner.communicate(b"\n", timeout=10)


def test_bench_table_is_the_default_output() -> None:
    done = run_bench("--quick", "--steps", "5", "--runs", "5")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("natflow bench: nats-server")
    assert lines[1].startswith("durability: fsync before every ack")
    for label in (
        "throughput: cpu per run, all processes",
        "raw: sync publish round trip",
        "sequential: step p50 (5 steps)",
        "throughput: 5 runs x 3 steps, 1 worker",
        "idle: start to first step",
        "replay: 1,000 events",
        "memory: worker peak RSS, throughput",
        "continue-as-new: loop of 2,500 steps",
        "continue-as-new: replay after a kill mid-loop",
    ):
        assert any(line.startswith(label) for line in lines), label
    assert lines[-1].startswith(("targets missed:", "all targets met"))


def test_a_killed_bench_leaves_no_process_running(tmp_path: Path) -> None:
    """SIGKILL to `natflow bench` while its workers run: its nats-server and worker processes
    (each in a session of its own) stop too. The workers were left running for good. (Its
    temporary store, and the batch staging that names it, are left: under ``tmp_path``.)"""
    bench = subprocess.Popen(
        [*natflow_command(), "bench", "--quick", "--json"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    kids: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(kids) < 2:  # the server and at least one worker
            assert bench.poll() is None, "the bench ended before its workers started"
            assert time.monotonic() < deadline, f"no workers within 60 s: {kids}"
            time.sleep(0.1)
            kids = children_of(bench.pid)
        bench.send_signal(signal.SIGKILL)
        bench.wait()
        left = gone(sorted(kids), timeout=20)
        assert not left, f"still running after the bench was killed: {left}"
    finally:
        bench.kill()
        bench.wait()
        kill_all(sorted(kids))


ENGINE_PARENT = """
import os, sys
from pathlib import Path
from natflow.bench._waits import engine_process
with engine_process(dict(os.environ), Path(sys.argv[1])) as proc:
    print(proc.pid, flush=True)
    sys.stdin.read()
"""


def test_the_bench_engine_ends_with_the_process_that_started_it(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """A bench killed outright (SIGKILL) while its engine phase ran left the `natflow engine`
    it started (in a session of its own) retrying its server for good."""
    parent = subprocess.Popen(
        [sys.executable, "-c", ENGINE_PARENT, str(tmp_path / "engine.log")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "NATFLOW_URL": nats_server.url},
    )
    engine: list[int] = []
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.strip(), "the engine did not start"
        engine.append(int(line))
        parent.kill()
        parent.wait()
        left = gone(engine, timeout=20)
        assert not left, "the bench's engine outlived the bench"
    finally:
        parent.kill()
        parent.wait()
        kill_all(engine)


def test_monitor_without_url_is_refused_naming_it(tmp_path: Path) -> None:
    """The embedded server's durability and message counts come from its own monitoring: a
    --monitor URL (another server's) was reported as the embedded server's."""
    done = run_bench("--quick", "--monitor", "http://127.0.0.1:9", env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 1, done.stderr[-3000:]
    assert "--monitor" in done.stderr and "--url" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before anything started


async def test_the_schedule_phase_counts_every_fire_and_returns_every_run_it_started(
    client: Client, engine: object
) -> None:
    """Fires were counted up to one before the pause (the last fire's run went uncounted),
    and that run was not among those the bench removes from a --url server."""
    async with running_worker(client, [bench_steps]):
        fires, run_ids = await schedule_lateness(client, "nb-test-every", 2.5)
    info = await client.connection.jsm.stream_info(
        HISTORY_STREAM, subjects_filter=f"{HISTORY_PREFIX}.*.run"
    )
    started = {s.split(".")[2] for s in info.state.subjects or {}}
    started = {r for r in started if r.startswith("nb-test-every-")}
    assert len(started) >= 2
    assert fires.fires == fires.runs == len(started) and fires.exactly_once
    assert set(run_ids) == started  # what the bench's cleanup purges


def test_the_embedded_bench_runs_without_the_users_deployment_settings() -> None:
    """A deployment's NATFLOW_* settings (replicas, JetStream domain, credentials) broke the
    embedded server's bench with nats-py tracebacks: it has none of them."""
    deployment = {
        "NATFLOW_REPLICAS": "3",
        "NATFLOW_DOMAIN": "hub",
        "NATFLOW_USER": "someone",
        "NATFLOW_PASSWORD": "secret",
        "NATFLOW_TLS_CA": "/nonexistent/ca.pem",
    }
    done = run_bench("--quick", "--json", "--scale", "1", "--runs", "6", env=deployment)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["points"][0]["throughput"]["completed"] == 6
    assert "runs without NATFLOW_DOMAIN, NATFLOW_PASSWORD, NATFLOW_REPLICAS" in done.stderr


def test_a_server_without_jetstream_is_named_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:  # its log, until it listens
            if "Server is ready" in line:
                break
        url = f"nats://127.0.0.1:{port}"
        done = run_bench("--quick", "--url", url, env={"TMPDIR": str(tmp_path)}, timeout=60)
    finally:
        server.kill()
        server.communicate()
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert f"JetStream does not answer at {url}" in done.stderr.splitlines()[-1]


def test_a_bench_that_cannot_connect_leaves_no_folder_behind(tmp_path: Path) -> None:
    """A failure before the first phase (no server at --url) left a natflow-bench-* folder in
    the temporary directory each time."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    done = run_bench("--quick", "--url", url, env={"TMPDIR": str(tmp_path)}, timeout=60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "no NATS server answered" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_monitor_that_is_no_url_is_refused_naming_the_flag(tmp_path: Path) -> None:
    args = ("--quick", "--url", "nats://127.0.0.1:1", "--monitor", "notaurl")
    done = run_bench(*args, env={"TMPDIR": str(tmp_path)}, timeout=60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.startswith("natflow bench: --monitor 'notaurl': not the URL")
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


async def test_monitoring_that_is_no_url_is_a_natflow_error_naming_the_callers_flag() -> None:
    with pytest.raises(NatflowError, match="check --monitor "):
        await read_jsz("notaurl", flag="--monitor")
    with pytest.raises(NatflowError, match="check --nats-monitor "):
        await read_jsz("notaurl")


def test_a_terminated_bench_says_where_its_logs_are(tmp_path: Path) -> None:
    """SIGTERM, as SIGINT does: the bench stops its processes and names the folder of logs
    it leaves (where the signal lands is up to chance: the next test makes it land where
    the bench used to lose it)."""
    bench = subprocess.Popen(
        [*natflow_command(), "bench", "--quick", "--json", "--steps", "5", "--runs", "5"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # its progress, until a phase with workers ended
            if line.startswith("[2/9]"):
                break
        bench.send_signal(signal.SIGTERM)
        rest = bench.stderr.read()
        assert bench.wait(60) == 128 + signal.SIGTERM, rest
    finally:
        bench.kill()
        bench.wait()
    assert "Traceback" not in rest
    logs = [p for p in tmp_path.iterdir() if p.name.startswith("natflow-bench-")]
    assert len(logs) == 1 and f"natflow bench: worker logs are in {logs[0]}" in rest, rest


SIGTERM_LANDS_IGNORED = """
import asyncio, os, signal, sys
from natflow.bench import _run
from natflow_engine._cli import main

class Ignored:
    def __del__(self) -> None:  # Python ignores what a signal handler raises here
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))

async def measure(*args):
    try:
        Ignored()
        await asyncio.sleep(30)
        print("went on", flush=True)
    finally:
        print("cleaned up", flush=True)

_run._measure = measure
sys.exit(main(["bench", "--quick"]))
"""


def test_sigterm_stops_the_bench_wherever_it_lands() -> None:
    """natflow's SIGTERM handler raises SystemExit wherever Python is: in a fork's logging
    hook (or any place that ignores exceptions) the bench went on as if not signalled. The
    bench takes SIGTERM as asyncio takes SIGINT: its task is cancelled, its cleanup runs."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_LANDS_IGNORED],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["cleaned up"]
