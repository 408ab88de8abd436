"""Record the histories under tests/histories/ that this module knows how to make.

Run on purpose only (``python -m tests.record_histories``), with the change that needs a new
recording; tests/test_recorded_histories.py replays every file on each test run. It starts an
embedded nats-server, the engine and a worker in this process, runs each scenario and writes
each run's events, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from natflow import Client, Workflow
from natflow_engine import HistoryStore, load_value, value_ref
from natflow_engine._reader import reader
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import HISTORY_STREAM, history_subject
from natflow_engine.events import RunSuspended, SignalWaited, encode_event

from examples.greeting import greet
from tests.helpers import running_engine, running_worker, wait_for
from tests.workflows_recorded import (
    SLOW_BEGAN,
    recorded_cancel,
    recorded_children,
    recorded_continue,
    recorded_flow,
    recorded_kid,
    recorded_patch,
    recorded_patch_v1,
    recorded_released,
    recorded_retry,
    recorded_values,
)

HISTORIES = Path(__file__).parent / "histories"


async def save(client: Client, run_id: str) -> None:
    events = await client.history(run_id)
    (HISTORIES / f"{run_id}.jsonl").write_bytes(b"".join(encode_event(e) + b"\n" for e in events))
    print(f"wrote {run_id}.jsonl ({len(events)} events)")


async def save_stored(client: Client, run_id: str) -> None:
    """The run's events as stored (large values as references), and each referenced value
    under histories/values/<sha256>.json, where the replay test reads them."""
    history = await HistoryStore(client.connection).read(run_id)
    (HISTORIES / "values").mkdir(exist_ok=True)
    lines = []
    for event in history.events:
        data = encode_event(event)
        for value in msgspec.json.decode(data).values():
            ref = value_ref(value)
            if ref is not None:
                stored = await load_value(client.connection, msgspec.json.encode(value))
                (HISTORIES / "values" / f"{ref.digest}.json").write_bytes(stored)
        lines.append(data + b"\n")
    (HISTORIES / f"{run_id}.jsonl").write_bytes(b"".join(lines))
    print(f"wrote {run_id}.jsonl ({len(lines)} events, values by reference)")


async def save_raw(client: Client, run_id: str) -> None:
    """The run's messages exactly as stored: one line per message (its last step's outcome
    inside its ``run_completed``)."""
    page = await reader(client.connection).read_all(HISTORY_STREAM, history_subject(run_id))
    (HISTORIES / f"{run_id}.jsonl").write_bytes(b"".join(m.data + b"\n" for m in page.messages))
    print(f"wrote {run_id}.jsonl ({len(page.messages)} messages, as stored)")


async def run_to_end(client: Client, workflow: Workflow, run_id: str, value: object) -> None:
    async with running_worker(client, [workflow]):
        await (await client.start(workflow, value, run_id=run_id)).result(timeout=20)


async def signalled(client: Client, workflow: Workflow, run_id: str, value: object) -> None:
    """Run until it waits for 'go', then signal it (the patched workflow's scenario)."""
    async with running_worker(client, [workflow]):
        handle = await client.start(workflow, value, run_id=run_id)

        async def waiting() -> bool:
            return any(isinstance(e, SignalWaited) for e in await client.history(run_id))

        await wait_for(waiting, what=f"{run_id} waiting")
        await client.signal(run_id, "go", "now")
        await handle.result(timeout=20)


async def cancelled_before_start(client: Client, run_id: str) -> None:
    handle = await client.start(recorded_cancel, 4, run_id=run_id)
    await client.cancel(run_id, "cancelled before any worker ran it")
    async with running_worker(client, [recorded_cancel]):
        try:
            await handle.result(timeout=20)
        except Exception as exc:  # the run ends cancelled: that is the scenario
            print(f"{run_id}: {exc}")


async def with_children(client: Client, run_id: str) -> None:
    async with running_worker(client, [recorded_children, recorded_kid]):
        await (await client.start(recorded_children, 5, run_id=run_id)).result(timeout=20)


async def debounced(client: Client, run_id: str) -> None:
    """Three starts within the window: one run (``run_id``, natflow's choice) with the last
    input, whose second step waits for its rate limit."""
    async with running_worker(client, [recorded_flow]):
        handles = [await client.start(recorded_flow, {"doc": "doc1", "v": v}) for v in (1, 2, 3)]
        assert {h.run_id for h in handles} == {run_id}
        await handles[0].result(timeout=20)


async def continued(client: Client, run_id: str) -> None:
    """Send 'extra' then 'go' while the first stretch waits for 'go': 'extra' is carried."""
    async with running_worker(client, [recorded_continue]):
        handle = await client.start(recorded_continue, {"n": 1, "total": 1}, run_id=run_id)

        async def waiting() -> bool:
            return any(isinstance(e, SignalWaited) for e in await client.history(run_id))

        await wait_for(waiting, what=f"{run_id} waiting")
        await client.signal(run_id, "extra", "carried")
        await client.signal(run_id, "go", "now")
        await handle.result(timeout=20)


async def released(client: Client, run_id: str) -> None:
    """Its first worker stops while the slow step runs (past a grace of 0: the release is
    recorded); a second worker runs the step again and completes the run."""
    async with running_worker(client, [recorded_released]):
        handle = await client.start(recorded_released, 3, run_id=run_id)

        async def slow_running() -> bool:
            return bool(SLOW_BEGAN)

        await wait_for(slow_running, what=f"{run_id} in its slow step")
    async with running_worker(client, [recorded_released]):
        await handle.result(timeout=20)


async def suspended(client: Client, run_id: str) -> None:
    """A signal of another name reaches the run as it waits for 'go': its worker takes the
    signal in and records that the run waits again (run_suspended); then 'go' ends it."""
    async with running_worker(client, [recorded_patch]):
        handle = await client.start(recorded_patch, 3, run_id=run_id)

        async def has(kind: type) -> bool:
            return any(isinstance(e, kind) for e in await client.history(run_id))

        await wait_for(lambda: has(SignalWaited), what=f"{run_id} waiting")
        await client.signal(run_id, "note", "not the one it waits for")
        await wait_for(lambda: has(RunSuspended), what=f"{run_id} waiting again")
        await client.signal(run_id, "go", "now")
        await handle.result(timeout=20)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(store_dir=Path(tmp) / "nats")
        server.start()
        try:
            async with running_engine(server.url):
                client = await Client.connect(server.url)
                async with client:
                    scenarios: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                        (
                            "recorded-retry-1",
                            lambda: run_to_end(client, recorded_retry, "recorded-retry-1", 7),
                        ),
                        (
                            "recorded-patch-old",
                            lambda: signalled(client, recorded_patch_v1, "recorded-patch-old", 3),
                        ),
                        (
                            "recorded-patch-new",
                            lambda: signalled(client, recorded_patch, "recorded-patch-new", 3),
                        ),
                        (
                            "recorded-cancel-early",
                            lambda: cancelled_before_start(client, "recorded-cancel-early"),
                        ),
                        (
                            "recorded-children-1",
                            lambda: with_children(client, "recorded-children-1"),
                        ),
                        (
                            "recorded_flow-d-doc1-1",
                            lambda: debounced(client, "recorded_flow-d-doc1-1"),
                        ),
                        (
                            "recorded-continue-1",
                            lambda: continued(client, "recorded-continue-1"),
                        ),
                        (
                            "recorded-packed-end",
                            lambda: run_to_end(
                                client, greet, "recorded-packed-end", {"name": "Bo"}
                            ),
                        ),
                        (
                            "recorded-released-1",
                            lambda: released(client, "recorded-released-1"),
                        ),
                        (
                            "recorded-suspended-1",
                            lambda: suspended(client, "recorded-suspended-1"),
                        ),
                        (
                            "recorded-values-1",
                            lambda: run_to_end(
                                client, recorded_values, "recorded-values-1", "natflow " * 9000
                            ),
                        ),
                    ]
                    chosen = set(sys.argv[1:])  # record only these (default: all)
                    for run_id, scenario in scenarios:
                        if chosen and run_id not in chosen:
                            continue
                        await scenario()
                        if run_id == "recorded-values-1":
                            await save_stored(client, run_id)
                        elif run_id == "recorded-packed-end":
                            await save_raw(client, run_id)
                        else:
                            await save(client, run_id)
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
