"""`make demo`: start a fresh nats-server with the engine, a worker, run every example.

Everything runs as real processes: `natflow dev` (embedded server plus engine, on free ports
with a new, temporary store, so a server already running elsewhere is never used and no
earlier demo's runs are shown) and `natflow worker examples.workflows:WORKFLOWS`. Each example
run's status, result and steps are printed; then everything started here is stopped and the
store removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from natflow import Client, NatflowError, RunFailed  # noqa: E402

from examples import flow, greeting, order  # noqa: E402

EXAMPLES = [greeting, order, flow]
NATFLOW = str(Path(sys.executable).parent / "natflow")


LOGS = ROOT / ".natflow"


def spawn(*args: str, url: str | None = None) -> subprocess.Popen[bytes]:
    log = open(LOGS / f"demo-{args[0]}.log", "wb")  # noqa: SIM115
    env = {**os.environ, "NATFLOW_URL": url} if url else None
    return subprocess.Popen(
        [NATFLOW, *args],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def server_url(dev: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    """The URL `natflow dev` prints once its server is up."""
    deadline = time.monotonic() + timeout
    log = LOGS / "demo-dev.log"
    while time.monotonic() < deadline:
        found = re.search(r"nats-server at (nats://\S+)", log.read_text())
        if found:
            return found.group(1)
        if dev.poll() is not None:
            raise SystemExit(f"natflow dev exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"natflow dev did not start within {timeout:g} s; see {log}")


async def connect_when_ready(url: str, deadline: float) -> Client:
    while True:
        try:
            return await Client.connect(url, connect_timeout=1.0)
        except NatflowError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def show(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def run_examples(url: str) -> int:
    client = await connect_when_ready(url, time.monotonic() + 20)
    failures = 0
    async with client:
        for example in EXAMPLES:
            about = (example.__doc__ or "").strip().splitlines()[0]
            print(f"\n-- examples/{example.__name__.rsplit('.', 1)[-1]}.py: {about}")
            for handle in await example.demo(client):
                with contextlib.suppress(RunFailed):
                    await handle.result(timeout=30)
                info = await handle.status()
                print(f"\n== {info.workflow} run {info.run_id}: {info.status}")
                print(f"   result: {show(info.result)}")
                steps = await client.steps(handle.run_id)
                width = max((len(step.name) for step in steps), default=0)
                for step in steps:
                    outcome = (
                        show(step.result)
                        if step.error is None
                        else (f"{step.error.type}: {step.error.message}")
                    )
                    print(f"   step {step.name:<{width}}  {step.status:<9} {outcome}")
                failures += info.status != "completed"
    return failures


# A stop asked for from outside (`timeout`, a CI runner, a closed terminal) ends the demo through
# main's cleanup: the children run in sessions of their own, so no signal reaches them but ours,
# and the default action would end this process without stopping them or removing the store.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # a shell's status for a signal: 130 after Ctrl-C


def stop(procs: list[subprocess.Popen[bytes]], store: str) -> None:
    # Bounded (30 s a process), so a second Ctrl-C or SIGTERM need not cut it short and leave
    # a child running.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    started_last_first = procs[::-1]  # the worker before the server it is connected to
    for proc in started_last_first:
        proc.send_signal(signal.SIGTERM)
    for proc in started_last_first:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(store, ignore_errors=True)


def main() -> int:
    for signum in STOP_SIGNALS:
        signal.signal(signum, exit_on_signal)
    LOGS.mkdir(exist_ok=True)
    store = tempfile.mkdtemp(prefix="natflow-demo-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        dev_args = ("--port", "0", "--http-port", "0", "--metrics-port", "0", "--ui-port", "0")
        procs.append(spawn("dev", *dev_args, "--store-dir", store))
        url = server_url(procs[0])
        print(f"make demo: a fresh natflow dev at {url} (store {store}, removed at the end)")
        procs.append(
            spawn("worker", "examples.workflows:WORKFLOWS", "--metrics-port", "0", url=url)
        )
        failures = asyncio.run(run_examples(url))
    finally:
        stop(procs, store)
    print(
        f"\n{'all example runs completed' if not failures else f'{failures} runs did not complete'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
