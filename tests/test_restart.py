"""Restarting a closed run from a step, with the code now deployed."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import anyio
import pytest
from natflow import Client, NatflowError, RunFailed, events
from natflow_engine._cli import main as cli_main
from natflow_engine._engine import Engine
from natflow_engine._restart import parse_step
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import dead_letters

from tests.helpers import count_lines, spawn_worker, stop, wait_for
from tests.workflows_proc import COUNTS_ENV

TARGET = "tests.workflows_restart"


def executions(path: Path, run_id: str) -> Counter[str]:
    return Counter(
        {k.split(":", 1)[1]: v for k, v in count_lines(path).items() if k.startswith(f"{run_id}:")}
    )


async def test_a_run_failed_by_a_bug_restarts_at_its_failed_step_once_fixed(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    counts = tmp_path / "counts.txt"
    env = {COUNTS_ENV: str(counts)}
    buggy = spawn_worker(
        nats_server.url, TARGET, env={**env, "NATFLOW_TEST_BUG": "1"}, log=tmp_path / "w1.log"
    )
    processes.append(buggy)
    handle = await client.start("four_steps", 1, run_id="buggy")
    with pytest.raises(RunFailed, match="the bug in step three"):
        await handle.result(timeout=30)
    assert executions(counts, "buggy") == Counter(one=1, two=1, three=1)
    original = await client.history("buggy")
    stop(buggy, signal.SIGTERM)

    fixed = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "w2.log")
    processes.append(fixed)
    with pytest.raises(NatflowError, match="no step nine#1"):
        await client.restart("buggy", from_step="nine")
    stop(fixed, signal.SIGKILL)  # no worker for a moment: the restarted run waits
    again = await client.restart("buggy")  # from its first failed step: three
    assert again.run_id == "buggy-r1"
    waiting = await client.describe("buggy-r1")
    assert (waiting.status, waiting.current) == ("pending", "restarts at step three#1")
    fixed = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "w3.log")
    processes.append(fixed)
    assert await again.result(timeout=30) == [1, 2, 3, 4]
    # Steps one and two were not run again; three (fixed) and four ran once each.
    assert executions(counts, "buggy") == Counter(one=1, two=1, three=1)
    assert executions(counts, "buggy-r1") == Counter(three=1, four=1)
    assert (await client.describe("buggy")).restarted_as == "buggy-r1"
    # Its last event is now the link, not its end: result() still sees it closed at once.
    with pytest.raises(RunFailed, match="the bug in step three"):
        await client.handle("buggy").result(timeout=5)
    assert (await client.describe("buggy-r1")).restarted_from == "buggy"
    # The original history stays readable, as it was, plus the link.
    now = await client.history("buggy")
    assert now[:-1] == original and isinstance(now[-1], events.RunRestarted)
    assert (await client.describe("buggy")).status == "failed"
    # A signal to the original is still dead-lettered, as for any closed run.
    await client.connection.js.publish("natflow.signal.buggy.late", b"1")

    async def dead_lettered() -> bool:
        return any(d.run_id == "buggy" for d in await dead_letters(client.connection))

    await wait_for(dead_lettered, what="the late signal's dead letter")

    # From a named step of a completed run, by the command line.
    code = await anyio.to_thread.run_sync(
        cli_main, ["--url", nats_server.url, "runs", "restart", "buggy-r1", "--from-step", "two#1"]
    )
    assert code == 0
    assert await client.handle("buggy-r1-r1").result(timeout=30) == [1, 2, 3, 4]
    assert executions(counts, "buggy-r1-r1") == Counter(two=1, three=1, four=1)
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(
        cli_main, ["--url", nats_server.url, "runs", "show", "buggy-r1"]
    )
    shown = capsys.readouterr().out
    assert code == 0 and "restarts  buggy\n" in shown and "restarted as buggy-r1-r1" in shown


async def test_a_restart_after_a_child_ended_keeps_its_outcome_and_does_not_run_it_again(
    client: Client,
    engine: Engine,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    counts = tmp_path / "counts.txt"
    env = {COUNTS_ENV: str(counts)}
    buggy = spawn_worker(
        nats_server.url, TARGET, env={**env, "NATFLOW_TEST_BUG": "1"}, log=tmp_path / "w1.log"
    )
    processes.append(buggy)
    handle = await client.start("order_with_child", 5, run_id="order")
    with pytest.raises(RunFailed, match="the bug in shipping"):
        await handle.result(timeout=30)
    stop(buggy, signal.SIGTERM)
    fixed = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "w2.log")
    processes.append(fixed)
    again = await client.restart("order")  # from its failed step, after the child
    assert await again.result(timeout=30) == 5
    charges = [line for line in counts.read_text().splitlines() if line.endswith(":charge")]
    assert len(charges) == 1, charges  # the child was not started again
    assert executions(counts, "order-r1") == Counter(ship=1)


async def test_an_open_run_is_not_restarted(client: Client, engine: Engine) -> None:
    await client.start("nobody-serves-this", run_id="still-open")
    with pytest.raises(NatflowError, match="cancel it first"):
        await client.restart("still-open")


def test_step_names_with_occurrences() -> None:
    assert parse_step("charge") == ("charge", 1)
    assert parse_step("charge#3") == ("charge", 3)
    assert parse_step("a#b") == ("a#b", 1)
