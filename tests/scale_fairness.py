"""Fairness figure at scale (a script, not a test): N runs of key A, then 10 of key B.

    .venv/bin/python -m tests.scale_fairness 3000

``per_key`` allows 2 runs per key at once; 2 worker processes serve it, the engine runs in
this process. Prints how long B's runs took after their start and how far A had got.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from natflow import Client, RunHandle
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer

from tests import workflows_limits as wl
from tests.helpers import running_engine, spawn_worker, stop, wait_for


async def measure(n: int) -> str:
    tmp = Path(tempfile.mkdtemp())
    (tmp / "gates").mkdir()
    env = {wl.LOG_ENV: str(tmp / "log"), wl.GATE_ENV: str(tmp / "gates")}
    os.environ.update(env)
    server = EmbeddedServer(store_dir=tmp / "nats")
    server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        client = await Client.connect(server.url)
        async with running_engine(server.url):
            for i in range(2):
                log = tmp / f"worker-{i}.log"
                procs.append(
                    spawn_worker(server.url, "tests.workflows_limits:make_worker", env=env, log=log)
                )

            async def both_registered() -> bool:
                return len(await list_workers(client.connection)) >= 2

            await wait_for(both_registered, timeout=60, what="2 workers registered")
            in_flight = asyncio.Semaphore(64)

            async def start(key: str, i: int) -> RunHandle:
                async with in_flight:
                    value = {"key": key, "seconds": 0.05}
                    return await client.start(wl.per_key, value, run_id=f"{key}-{i}")

            began = time.monotonic()
            a_runs = await asyncio.gather(*(start("A", i) for i in range(n)))
            b_began = time.monotonic()
            b_runs = [await start("B", i) for i in range(10)]
            b_done = []
            for handle in b_runs:
                await handle.result(timeout=1800)
                b_done.append(time.monotonic() - b_began)
            lines = (tmp / "log").read_text().splitlines()
            a_by_then = sum(1 for line in lines if line.startswith("A "))
            for handle in a_runs:
                await handle.result(timeout=3600)
            ended = time.monotonic()
        await client.close()
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
        server.stop()
    return (
        f"N={n}: started A in {b_began - began:.1f} s; B's 10 runs done {b_done[-1]:.1f} s "
        f"after their start (first {b_done[0]:.1f} s); A runs finished by then: {a_by_then}; "
        f"all A done {ended - began:.1f} s after start"
    )


if __name__ == "__main__":
    print(asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)))
