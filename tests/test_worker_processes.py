"""`natflow worker --processes N` (issue 20): one command runs N worker processes, starts again
one that dies, and drains them all on SIGTERM. Real processes, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import anyio
import pytest
from natflow import Client
from natflow_engine._cli import build_parser
from natflow_engine._server import EmbeddedServer

from examples.greeting import greet
from tests.helpers import ROOT, spawn_worker, wait_for
from tests.links import free_port
from tests.test_cli import NATFLOW


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``, read from /proc."""
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


async def test_processes_runs_supervised_workers_and_drains_them_on_sigterm(
    nats_server: EmbeddedServer,
    client: Client,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "workers.log"
    supervisor = spawn_worker(
        nats_server.url,
        "examples.greeting:greet",
        "--processes",
        "2",
        "--grace",
        "5",
        "--metrics-port",
        str(metrics_port := free_port()),
        log=log,
    )
    processes.append(supervisor)

    async def two_children() -> set[int]:
        kids = children_of(supervisor.pid)
        return kids if len(kids) == 2 else set()

    first = await wait_for(two_children, timeout=30, what="two worker processes")

    # the workers serve: a run started now completes
    handle = await client.start(greet, {"name": "Ada"}, run_id="procs-1")
    assert "Ada" in (await handle.result(timeout=30))["greeting"]

    # a worker that dies is started again
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> set[int]:
        kids = children_of(supervisor.pid)
        return kids if len(kids) == 2 and victim not in kids else set()

    second = await wait_for(replaced, timeout=30, what="the killed worker started again")
    assert max(first) in second  # the other one was left alone
    handle = await client.start(greet, {"name": "Bo"}, run_id="procs-2")
    await handle.result(timeout=30)

    # one endpoint: the supervisor serves the children's metrics summed, a dead child's too
    async def both_counted() -> bool:
        return _metric_sum(metrics_port, "natflow_steps_total", 'workflow="greet"') == 2

    await wait_for(both_counted, timeout=10, what="both runs' steps on the supervisor's port")

    # SIGTERM drains every child and the supervisor exits cleanly
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert children_of(supervisor.pid) == set()
    for pid in second:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = log.read_text()
    assert "exited with code" in text and "draining 2 worker processes" in text


async def test_children_that_cannot_start_end_the_command_with_their_error(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Restarting them would print the same error every 30 s; one process would have exited."""
    done = await _worker_command(nats_server.url, "tests.workflows_proc:make_nothing", "2")
    assert done.returncode == 1, done.stderr
    assert "returned 42, not a Worker" in done.stderr
    assert "could not start" in done.stderr
    assert "starting it again" not in done.stderr
    # A callable natflow cannot call (it takes two arguments): named, no traceback.
    two = await _worker_command(nats_server.url, "tests.workflows_proc:make_two", "1")
    assert two.returncode == 1 and "cannot be called so" in two.stderr, two.stderr
    assert "Traceback" not in two.stderr


async def _worker_command(
    url: str, target: str, processes: str
) -> subprocess.CompletedProcess[str]:
    """`natflow worker TARGET --processes N` to its end (one that cannot start ends)."""
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [*NATFLOW, "worker", target, "--processes", processes],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "NATFLOW_URL": url},
            capture_output=True,
            text=True,
            timeout=60,
        )
    )


def _metric_sum(port: int, name: str, label: str) -> float:
    """The sum of ``name``'s samples that carry ``label``, scraped from ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def test_one_worker_process_per_core_by_default() -> None:
    args = build_parser().parse_args(["worker", "examples.greeting:greet"])
    assert args.processes == (os.cpu_count() or 1)
    assert build_parser().parse_args(["worker", "x", "--processes", "1"]).processes == 1


def test_processes_takes_a_count_or_auto_and_says_so() -> None:
    done = subprocess.run(
        [*NATFLOW, "worker", "examples.greeting:greet", "--processes", "-1"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--processes" in done.stderr and "auto" in done.stderr


async def test_workers_of_a_killed_supervisor_stop_too(
    nats_server: EmbeddedServer, processes: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    supervisor = spawn_worker(
        nats_server.url,
        "examples.greeting:greet",
        "--processes",
        "2",
        "--grace",
        "1",
        "--metrics-port",
        "0",
        log=tmp_path / "workers.log",
    )
    processes.append(supervisor)

    async def two_children() -> set[int]:
        kids = children_of(supervisor.pid)
        return kids if len(kids) == 2 else set()

    kids = await wait_for(two_children, timeout=30, what="two worker processes")
    supervisor.kill()
    supervisor.wait()

    async def all_gone() -> bool:
        return all(zombie(pid) for pid in kids)  # gone, or dead and not yet reaped

    await wait_for(all_gone, timeout=30, what="the orphaned workers to stop")


def zombie(pid: int) -> bool:
    """The process has exited (whether or not its parent has reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
async def test_a_second_ctrl_c_stops_a_draining_supervisor_and_its_workers_at_once(
    nats_server: EmbeddedServer,
    client: Client,
    engine: object,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """A step outlives the grace; the first Ctrl-C drains, the second stops everything at
    once (it killed the supervisor outright: children left draining unwatched, its metrics
    folder left behind), and Ctrl-C exits 130 as the README says."""
    from tests.test_poison import counts
    from tests.workflows_poison import COUNTS_ENV

    supervisor = spawn_worker(
        nats_server.url,
        "tests.workflows_poison:make_worker",
        "--processes",
        "2",
        "--grace",
        "60",
        "--metrics-port",
        str(free_port()),
        env={COUNTS_ENV: str(tmp_path / "counts.txt")},
        log=tmp_path / "workers.log",
    )
    processes.append(supervisor)
    await client.start("thread_sleeper", 120, run_id="long")

    async def running() -> bool:
        return counts(tmp_path / "counts.txt")["long:sleeps_in_a_thread"] >= 1

    await wait_for(running, timeout=30, what="the long step running")
    kids = children_of(supervisor.pid)
    supervisor.send_signal(signal.SIGINT)
    await anyio.sleep(1)
    assert supervisor.poll() is None  # draining: the step has a minute
    supervisor.send_signal(signal.SIGINT)
    code = await anyio.to_thread.run_sync(lambda: supervisor.wait(timeout=15))
    assert code == 130
    for pid in kids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "again: stopping the worker processes now" in (tmp_path / "workers.log").read_text()
    await client.terminate("long", "done testing")
