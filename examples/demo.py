"""`make demo`: start nats-server (nats.conf) with the engine, a worker, run every example.

Everything runs as real processes: `natflow dev` (embedded server plus engine) and
`natflow worker examples.workflows:WORKFLOWS`. Each example run's status, result and steps
are printed; then everything started here is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from natflow import Client, NatflowError, RunFailed  # noqa: E402

from examples import greeting, order  # noqa: E402

EXAMPLES = [greeting, order]
NATFLOW = str(Path(sys.executable).parent / "natflow")


def spawn(*args: str) -> subprocess.Popen[bytes]:
    log = open(ROOT / ".natflow" / f"demo-{args[0]}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [NATFLOW, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


async def connect_when_ready(deadline: float) -> Client:
    while True:
        try:
            return await Client.connect(connect_timeout=1.0)
        except NatflowError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def show(value: object) -> str:
    return msgspec.json.encode(value).decode()


async def run_examples() -> int:
    client = await connect_when_ready(time.monotonic() + 20)
    failures = 0
    async with client:
        for example in EXAMPLES:
            for handle in await example.demo(client):
                with contextlib.suppress(RunFailed):
                    await handle.result(timeout=30)
                info = await handle.status()
                print(f"\n== {info.workflow} run {info.run_id}: {info.status}")
                print(f"   result: {show(info.result)}")
                for step in await client.steps(handle.run_id):
                    outcome = (
                        show(step.result)
                        if step.error is None
                        else (f"{step.error.type}: {step.error.message}")
                    )
                    print(f"   step {step.name:<8} {step.status:<9} {outcome}")
                failures += info.status != "completed"
    return failures


def main() -> int:
    (ROOT / ".natflow").mkdir(exist_ok=True)
    os.environ.setdefault("NATFLOW_URL", "nats://127.0.0.1:4222")
    dev = spawn("dev")
    worker = spawn("worker", "examples.workflows:WORKFLOWS")
    try:
        failures = asyncio.run(run_examples())
    finally:
        for proc in (worker, dev):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, dev):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"\n{'all example runs completed' if not failures else f'{failures} runs did not complete'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
