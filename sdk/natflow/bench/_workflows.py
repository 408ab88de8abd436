"""What ``natflow bench`` runs in its worker processes, and its replay probe.

Worker processes serve :data:`WORKFLOWS` (``natflow worker natflow.bench._workflows:WORKFLOWS``).
The replay probe (``python -m natflow.bench._workflows replay URL RUN_ID REPEAT``) is a fresh
process that rebuilds one run the way a worker does after a crash, and prints its timings and
its peak memory as JSON.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from typing import Any

import msgspec
from natflow_engine import HistoryStore, connect_options, run_event_loop

from .._client import Client
from .._context import WorkflowContext
from .._replay import WorkflowState
from .._workflow import workflow

BENCH_QUEUE = "natflow-bench"
STEP_NAME = "s"


async def empty_step() -> None:
    """An empty async step: everything it costs is natflow's."""


@workflow(name="natflow-bench-steps", queue=BENCH_QUEUE)
async def bench_steps(ctx: WorkflowContext, n: int) -> int:
    """``n`` empty steps, one after another."""
    for _ in range(n):
        await ctx.step(STEP_NAME, empty_step)
    return n


@workflow(name="natflow-bench-sleep", queue=BENCH_QUEUE)
async def bench_sleep(ctx: WorkflowContext, seconds: float) -> None:
    """One durable sleep: the engine's timer wakes the run (nothing holds it meanwhile)."""
    await ctx.sleep("t", seconds)


MARKS_ENV = "NATFLOW_BENCH_MARKS"


def marked_step(seconds: float) -> int:
    """A step that notes which process started it and when (a line in ``$MARKS_ENV``)."""
    with open(os.environ[MARKS_ENV], "a") as out:
        out.write(f"{os.getpid()} {time.time():.6f}\n")
    time.sleep(seconds)
    return os.getpid()


@workflow(name="natflow-bench-kill", queue=BENCH_QUEUE)
async def bench_kill(ctx: WorkflowContext, seconds: float) -> int:
    """One long step, for killing its worker in the middle of it."""
    return await ctx.step("slow", marked_step, seconds)


class LoopInput(msgspec.Struct):
    """Where a :func:`bench_loop` stands: ``done`` of ``total`` steps."""

    total: int
    done: int = 0


@workflow(name="natflow-bench-loop", queue=BENCH_QUEUE)
async def bench_loop(ctx: WorkflowContext, loop: LoopInput) -> int:
    """``total`` empty steps in one run, continuing as new whenever natflow suggests it."""
    while loop.done < loop.total:
        await ctx.step(STEP_NAME, empty_step)
        loop.done += 1
        if ctx.continue_as_new_suggested and loop.done < loop.total:
            ctx.continue_as_new(loop)
    return loop.done


WORKFLOWS = [bench_steps, bench_sleep, bench_kill, bench_loop]
_BY_NAME = {w.name: w for w in WORKFLOWS}


class ReplayTimes(msgspec.Struct, kw_only=True):
    """One replay probe: per repetition, the history read and the rebuild, in ms."""

    events: int
    read_ms: list[float]
    rebuild_ms: list[float]
    peak_rss_kib: int


def env_connect_options() -> dict[str, Any]:
    """Credentials and TLS from the ``NATFLOW_*`` variables, as ``natflow`` reads them."""
    names = ("creds", "user", "password", "token", "tls_ca", "tls_cert", "tls_key")
    values = {name: os.environ.get(f"NATFLOW_{name.upper()}") for name in names}
    return connect_options(argparse.Namespace(**values))


async def measure_replay(
    url: str, run_id: str, repeat: int, workflow_name: str = bench_steps.name
) -> ReplayTimes:
    """Read and rebuild ``run_id`` ``repeat`` times, as a worker taking the run over would."""
    served = _BY_NAME[workflow_name]
    client = await Client.connect(url, **env_connect_options())
    try:
        store = HistoryStore(client.connection)
        reads: list[float] = []
        rebuilds: list[float] = []
        events = 0
        for _ in range(repeat):
            t0 = time.perf_counter()
            history = await store.read(run_id)
            t1 = time.perf_counter()
            state = WorkflowState(served, history)
            state.begin()
            t2 = time.perf_counter()
            if state.block is not None:
                raise RuntimeError(f"replay of {run_id} diverged: {state.block}")
            state.close()
            events = len(history.events)
            reads.append((t1 - t0) * 1e3)
            rebuilds.append((t2 - t1) * 1e3)
    finally:
        await client.close()
    return ReplayTimes(
        events=events,
        read_ms=reads,
        rebuild_ms=rebuilds,
        peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[0] != "replay":
        print(
            "usage: python -m natflow.bench._workflows replay URL RUN_ID REPEAT [WORKFLOW]",
            file=sys.stderr,
        )
        return 2
    times = run_event_loop(measure_replay(argv[1], argv[2], int(argv[3]), *argv[4:]))
    sys.stdout.write(msgspec.json.encode(times).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
