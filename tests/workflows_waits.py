"""Workflows that sleep and wait for signals, for the timer and signal tests, and the
process helpers those tests share.

Served in-process by the tests, or by real worker processes as
``natflow worker tests.workflows_waits:make_worker``. The process worker answers
``test.natflow.held.<pid>`` with the runs it holds (``Worker.held_runs``), so a test can see
from outside that a worker holds no sleeping run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
from natflow import Client, SignalTimeout, Worker, WorkflowContext, workflow
from nats.aio.msg import Msg

MAX_RUNS_ENV = "NATFLOW_TEST_MAX_RUNS"


def held_subject(pid: int) -> str:
    return f"test.natflow.held.{pid}"


def wall_clock() -> float:
    """A step body: the worker's wall clock, recorded in history (so replays agree)."""
    return time.time()


async def pause(seconds: float) -> float:
    """A step body that takes ``seconds``; returns when it ended."""
    await anyio.sleep(seconds)
    return time.time()


@workflow(name="nap")
async def nap(ctx: WorkflowContext, seconds: float) -> dict[str, float]:
    """Sleep ``seconds``; the steps around the sleep measure it on the worker's clock."""
    before = await ctx.step("before", wall_clock)
    await ctx.sleep("nap", seconds)
    after = await ctx.step("after", wall_clock)
    return {"before": before, "after": after}


@workflow(name="wait_once")
async def wait_once(ctx: WorkflowContext, timeout: float | None) -> Any:
    """Wait for one signal ``x``; a timeout is answered with ``"timeout"``."""
    try:
        return await ctx.wait_for_signal("x", timeout=timeout)
    except SignalTimeout:
        return "timeout"


@workflow(name="step_then_wait")
async def step_then_wait(ctx: WorkflowContext, seconds: float) -> Any:
    """A step that takes ``seconds``, then a wait for ``x`` with no timeout."""
    await ctx.step("work", pause, seconds)
    return await ctx.wait_for_signal("x")


@workflow(name="wait_n")
async def wait_n(ctx: WorkflowContext, n: int) -> list[Any]:
    """``n`` waits for ``x`` in a row, then one more with a short timeout (should time out)."""
    got = [await ctx.wait_for_signal("x") for _ in range(n)]
    try:
        got.append(await ctx.wait_for_signal("x", timeout=1.5))
    except SignalTimeout:
        got.append("no more")
    return got


@workflow(name="timed_wait")
async def timed_wait(ctx: WorkflowContext, timeout: float) -> dict[str, Any]:
    """Wait for ``never`` with a timeout; the steps around it measure how long it took."""
    before = await ctx.step("before", wall_clock)
    try:
        value = await ctx.wait_for_signal("never", timeout=timeout)
    except SignalTimeout as exc:
        after = await ctx.step("after", wall_clock)
        return {"timeout": True, "waited": after - before, "error": str(exc)}
    return {"timeout": False, "value": value}


@workflow(name="race")
async def race(ctx: WorkflowContext, timeout: float) -> dict[str, Any]:
    """A wait racing its timeout; a signal that lost the race is picked up by a second wait."""
    try:
        return {"won": await ctx.wait_for_signal("x", timeout=timeout)}
    except SignalTimeout:
        return {"late": await ctx.wait_for_signal("x", timeout=10)}


WORKFLOWS = [nap, wait_once, step_then_wait, wait_n, timed_wait, race]


class ProbedWorker(Worker):
    """A Worker that tells a test which runs it holds (and nothing else)."""

    def __init__(self, client: Client, *args: Any, **kwargs: Any) -> None:
        super().__init__(client, *args, **kwargs)
        self._probe_nc = client.connection.nc

    async def run(self) -> None:
        sub = await self._probe_nc.subscribe(held_subject(os.getpid()), cb=self._answer)
        try:
            await super().run()
        finally:
            await sub.unsubscribe()

    async def _answer(self, msg: Msg) -> None:
        await msg.respond(json.dumps({"held": self.held_runs}).encode())


def make_worker(client: Client) -> Worker:
    return ProbedWorker(
        client, WORKFLOWS, max_concurrent_runs=int(os.environ.get(MAX_RUNS_ENV, "100"))
    )


# -- helpers for the tests (not used by the worker processes) ------------------------------

ROOT = Path(__file__).resolve().parent.parent
TARGET = "tests.workflows_waits:make_worker"


def spawn_engine(url: str, log: Path) -> subprocess.Popen[bytes]:
    """`natflow engine` as a real process (its own session, for clean signals)."""
    env = {**os.environ, "NATFLOW_URL": url, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "natflow_engine", "engine"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def engine_process(
    url: str, log: Path, procs: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Start `natflow engine` (added to ``procs``) and wait until its dispatcher runs."""
    from tests.helpers import wait_for

    path = anyio.Path(log)
    offset = len(await path.read_text()) if await path.exists() else 0
    proc = spawn_engine(url, log)
    procs.append(proc)

    async def running() -> bool:
        text = await path.read_text()
        assert proc.poll() is None, text[-3000:]
        return "engine dispatcher running" in text[offset:]

    await wait_for(running, timeout=20, what="the engine process to run")
    return proc


async def registered(client: Client, count: int) -> None:
    from natflow_engine._registry import list_workers

    from tests.helpers import wait_for

    async def enough() -> bool:
        return len(await list_workers(client.connection)) >= count

    await wait_for(enough, timeout=20, what=f"{count} registered workers")


async def held_by(client: Client, pid: int) -> list[str]:
    """The runs a process worker (``make_worker``) holds now."""
    reply = await client.connection.nc.request(held_subject(pid), b"", timeout=5)
    runs: list[str] = json.loads(reply.data)["held"]
    return runs


def tag(event: Any) -> str:
    return str(type(event).__struct_config__.tag)


def of(events: list[Any], kind: type[Any]) -> list[Any]:
    """The events of one kind, in history order."""
    return [e for e in events if isinstance(e, kind)]


def rss_kb(pid: int) -> int:
    """The process's resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")
