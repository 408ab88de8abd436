"""`natflow bench --scale`: the throughput phase per worker count, with client and engine
processes, and what bound each point (no thresholds: figures only)."""

from __future__ import annotations

import argparse
import json
import os

import pytest
from natflow import InvalidInput
from natflow._supervisor import process_count
from natflow.bench._report import Cpu, Throughput, stats
from natflow.bench._scale import _row, point
from natflow.bench._sizes import parse_scale, sizes_from

from tests.test_bench import assert_number, assert_stats, run_bench


def test_scale_runs_the_throughput_phase_per_worker_count_with_client_and_engine_processes() -> (
    None
):
    scale = ["--scale", "1,2", "--runs", "24", "--clients", "2", "--engines", "2"]
    done = run_bench("--quick", "--json", *scale)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["kind"] == "scale"
    assert report["environment"]["durability"].startswith("fsync before every ack")
    assert_stats(report["raw"]["publish_rtt_ms"])
    assert "[3/3] throughput: 24 runs x 3 steps, 2 workers, 2 clients, 2 engines" in done.stderr

    points = report["points"]
    assert [p["throughput"]["workers"] for p in points] == [1, 2]
    for p in points:
        tp = p["throughput"]
        assert tp["clients"] == 2 and tp["engines"] == 2
        # every run started by one of the two client processes and seen done by it
        assert tp["completed"] == tp["runs"] == 24 and tp["failed"] == 0
        assert_stats(tp["start_to_result_ms"], count=24)
        assert_number(tp["runs_per_s"])
        for cpu in (tp["cpu"], tp["cpu_running"]):
            # the client processes' CPU counts beside this process's, and the engines'
            assert cpu["client"] > 0 and cpu["engine"] > 0 and cpu["workers"] > 0
        assert tp["cpu_running"]["window_s"] <= tp["cpu"]["window_s"]
        # The whole window holds the running one: no process's CPU (the client processes'
        # included, read before they exit) may be smaller over it. 10 ms kernel ticks.
        for kind in ("client", "workers", "engine", "server"):
            whole = tp["cpu"][kind] * tp["cpu"]["window_s"] / 100
            running = tp["cpu_running"][kind] * tp["cpu_running"]["window_s"] / 100
            assert whole >= running - 0.05, (kind, whole, running)
        assert p["busiest"] in {"client", "worker", "engine", "server", "machine"}
        assert p["busiest_pct"] > 0


def test_a_worker_count_given_twice_runs_its_own_runs_each_time() -> None:
    # Each point starts runs of its own: run ids shared with an earlier point would come
    # back already done, measuring no work at all (no worker CPU, about 17 messages a run).
    done = run_bench("--quick", "--json", "--scale", "1,1", "--runs", "12")
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (p["throughput"] for p in json.loads(done.stdout)["points"])
    assert first["completed"] == second["completed"] == 12
    assert second["cpu_running"]["workers"] > 0
    assert second["server_msgs_per_run"] > 0.7 * first["server_msgs_per_run"], (first, second)


def test_scale_table_names_what_bound_each_point() -> None:
    done = run_bench("--quick", "--scale", "1", "--runs", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("natflow bench --scale: nats-server")
    assert lines[1].startswith("durability: fsync before every ack")
    head = next(i for i, line in enumerate(lines) if line.lstrip().startswith("workers"))
    assert "bound by" in lines[head]
    row = lines[head + 1].split()
    assert row[:3] == ["1", "1", "1"]  # workers, clients, engines


@pytest.mark.parametrize("text", ["", "0", "1,x", "4,-1", ","])
def test_a_scale_that_is_not_worker_counts_is_refused_naming_it(text: str) -> None:
    with pytest.raises(InvalidInput, match="--scale") as info:
        parse_scale(text)
    assert "1,4,8,16" in str(info.value)


def test_client_and_engine_counts_must_be_positive() -> None:
    args = argparse.Namespace(quick=True, steps=None, runs=None, workers=None, concurrency=None)
    assert sizes_from(argparse.Namespace(**vars(args), clients=3, engines=2)).clients == 3
    with pytest.raises(InvalidInput, match="--engines must be at least 1"):
        sizes_from(argparse.Namespace(**vars(args), clients=None, engines=0))
    # A typo of 100,000 engines started engine after engine until the machine choked.
    with pytest.raises(InvalidInput, match="--engines 100000 is more processes"):
        sizes_from(argparse.Namespace(**vars(args), clients=None, engines=100_000))


def test_the_throughput_phase_runs_as_many_workers_as_natflow_worker_does() -> None:
    args = argparse.Namespace(steps=None, runs=None, workers=None, concurrency=None)
    full = sizes_from(argparse.Namespace(**vars(args), quick=False))
    assert full.workers == os.cpu_count() == process_count("auto")  # `natflow worker`'s default
    assert sizes_from(argparse.Namespace(**vars(args), quick=True)).workers == 1
    chosen = argparse.Namespace(**{**vars(args), "workers": 3}, quick=False)
    assert sizes_from(chosen).workers == 3


def test_bad_scale_on_the_command_line_is_a_clear_error_before_anything_starts() -> None:
    done = run_bench("--scale", "four", timeout=60)
    assert done.returncode != 0
    assert "--scale 'four'" in done.stderr and "Traceback" not in done.stderr


def _point_of(
    *, client: float, workers: float, engine: float, server: float | None, w: int = 4, e: int = 1
) -> tuple[str, bool | None]:
    found = point(_throughput(client, workers, engine, server, w, e), cpus=16)
    return found.busiest, found.saturated


def _throughput(
    client: float, workers: float, engine: float, server: float | None, w: int = 4, e: int = 1
) -> Throughput:
    # A server this machine cannot read leaves "other" unknown too (CpuWindow.stop).
    other = None if server is None else 0.0
    cpu = Cpu(
        window_s=5.0, client=client, workers=workers, server=server, other=other, engine=engine
    )
    return Throughput(
        runs=100,
        workers=w,
        engines=e,
        completed=100,
        failed=0,
        wall_s=1.0,
        runs_per_s=100.0,
        steps_per_s=300.0,
        history_appends_per_s=500.0,
        start_rate_per_s=1000.0,
        start_to_result_ms=stats([1.0]),
        cpu=cpu,
        worker_peak_rss_mib=[None] * w,
    )


def test_what_bound_a_point_is_the_machine_then_a_python_process_then_the_server() -> None:
    # 16 cores spent: the machine, whatever the server's share
    assert _point_of(client=100, workers=1000, engine=80, server=300) == ("machine", True)
    # one engine process at a whole core on a machine with cores to spare
    assert _point_of(client=30, workers=200, engine=97, server=150) == ("engine", True)
    # per process: 4 workers at 360 % are 90 % each
    assert _point_of(client=30, workers=360, engine=50, server=150) == ("worker", True)
    # the server past one core with no Python process near one: its serial work
    assert _point_of(client=30, workers=120, engine=40, server=170) == ("server", True)
    # nothing near its limit: the busiest, not saturated
    assert _point_of(client=30, workers=120, engine=40, server=60) == ("server", False)
    assert _point_of(client=30, workers=120, engine=40, server=20) == ("engine", False)


def test_a_server_whose_cpu_is_not_observed_leaves_the_bound_unknown() -> None:
    """With --url the server's CPU is not this machine's to read: it showed as 0 % and the
    point as "nothing saturated", though the server may have been what bound it."""
    assert _point_of(client=30, workers=120, engine=40, server=None) == ("engine", None)
    # what is observed still says so: a Python process at a whole core, a machine spent
    assert _point_of(client=30, workers=120, engine=97, server=None) == ("engine", True)
    assert _point_of(client=100, workers=1400, engine=80, server=None) == ("machine", True)
    row = _row(point(_throughput(30, 120, 40, None), cpus=16))
    assert row[-2] == "30, 30, 40, n/a"  # client, worker, engine (each), server
    assert row[-1] == "unknown (server CPU not observed)"
