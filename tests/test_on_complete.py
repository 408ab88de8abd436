"""``on_complete``: started exactly once per closed run, whatever closed it."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import anyio
import msgspec
import pytest
from natflow import (
    AesGcmCodec,
    Client,
    RunCancelled,
    RunFailed,
    RunNotFound,
    RunOutcome,
    WorkflowContext,
    events,
    workflow,
)
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer

from tests.helpers import running_worker, stop, wait_for
from tests.workflows_closing import OUTCOMES_ENV, closing, echo_outcome, report
from tests.workflows_waits import engine_process

WAYS = ("complete", "fail", "cancel", "terminate")
CLOSED_AS = {"complete": "completed", "fail": "failed", "cancel": "cancelled"}


async def started(client: Client, run_id: str) -> bool:
    try:
        await client.describe(run_id)
        return True
    except RunNotFound:
        return False


def outcomes(path: Path) -> Counter[str]:
    return Counter(path.read_text().splitlines()) if path.exists() else Counter()


async def test_on_complete_gets_the_outcome(
    client: Client, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "outcomes.txt"
    monkeypatch.setenv(OUTCOMES_ENV, str(out))
    async with running_worker(client, [closing, report]):
        await client.start(closing, {"way": "fail", "nap": 0}, run_id="f1", on_complete=report)
        with pytest.raises(RunFailed):
            await client.handle("f1").result(timeout=20)
        await wait_for(lambda: started(client, "f1-oncomplete"), what="the hook's run")
        assert await client.handle("f1-oncomplete").result(timeout=20) == "failed"
    start = (await client.history("f1-oncomplete"))[0]
    assert isinstance(start, events.RunStarted)
    given = msgspec.json.decode(start.input)
    assert given["run_id"] == "f1" and given["workflow"] == "closing"
    assert given["status"] == "failed" and given["error"]["message"] == "failed on purpose"
    assert outcomes(out) == Counter(["f1 failed"])


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_on_complete_runs_once_for_each_of_50_runs_across_an_engine_crash(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "outcomes.txt"
    monkeypatch.setenv(OUTCOMES_ENV, str(out))
    log = tmp_path / "engine.log"
    engine = await engine_process(nats_server.url, log, processes)
    runs = {f"close-{i}": WAYS[i % 4] for i in range(50)}
    async with running_worker(client, [closing, report]):
        for i, (run_id, way) in enumerate(runs.items()):
            # Naps up to 3 s: some close before the crash, some while the engine is down,
            # some after it is back; sleeps over 1 s need the engine's timers.
            how = {"way": way, "nap": (i % 7) * 0.5}
            await client.start(closing, how, run_id=run_id, on_complete="report")
        await anyio.sleep(1.0)
        stop(engine, signal.SIGKILL)
        for run_id, way in runs.items():
            if way == "cancel":
                await client.cancel(run_id, "by the test")
            elif way == "terminate":
                await client.terminate(run_id, "by the test")
        await anyio.sleep(1.0)
        await engine_process(nats_server.url, log, processes)
        for run_id, way in runs.items():
            handle = client.handle(run_id)
            if way == "complete":
                assert await handle.result(timeout=60) == "done"
            else:
                with pytest.raises(RunFailed if way == "fail" else RunCancelled):
                    await handle.result(timeout=60)

        async def all_reported() -> bool:
            return len(outcomes(out)) == len(runs)

        # An event the killed engine took and never acknowledged comes back after its 30 s
        # ack deadline.
        await wait_for(all_reported, timeout=90, what="every on_complete run")
        await anyio.sleep(2.0)  # room for a duplicate to show up
    expected = Counter(
        f"{run_id} {CLOSED_AS.get(way, 'terminated')}" for run_id, way in runs.items()
    )
    assert outcomes(out) == expected
    for run_id in runs:  # one hook run each, under its derived id, and it completed
        assert (await client.describe(f"{run_id}-oncomplete")).status == "completed"

    seen: dict[str, str] = {}

    async def indexed() -> bool:  # the engine's index lags a little behind history
        hooks = await client.list(workflow="report", limit=500)
        seen.clear()
        seen.update((r.run_id, r.status) for r in hooks)
        return len(hooks) == len(runs) and all(r.status == "completed" for r in hooks)

    try:
        await wait_for(indexed, timeout=30, what="the hook runs in the index")
    except AssertionError as exc:  # say which: a missing run and a stuck status differ
        behind = {r: s for r, s in seen.items() if s != "completed"}
        missing = sorted({f"{r}-oncomplete" for r in runs} - set(seen))
        raise AssertionError(f"{exc}; not completed: {behind}; missing: {missing}") from None
    hooks = await client.list(workflow="report", limit=500)
    assert sorted(r.run_id for r in hooks) == sorted(f"{r}-oncomplete" for r in runs)


async def test_on_complete_opens_the_sealed_outcome_of_a_run(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    """With a payload codec the closed run's result and error are sealed in history; the
    engine (no key) hands them on as they are, and the hook's worker opens them."""
    codec = AesGcmCodec({"k1": bytes(range(32))}, current="k1")
    client = await Client.connect(nats_server.url, codec=codec)
    try:
        async with running_worker(client, [closing, echo_outcome]):
            for run_id, way in (("sealed-ok", "complete"), ("sealed-bad", "fail")):
                await client.start(
                    closing, {"way": way, "nap": 0}, run_id=run_id, on_complete=echo_outcome
                )
            await wait_for(lambda: started(client, "sealed-ok-oncomplete"), what="hook 1")
            await wait_for(lambda: started(client, "sealed-bad-oncomplete"), what="hook 2")
            ok = await client.handle("sealed-ok-oncomplete").result(timeout=20)
            bad = await client.handle("sealed-bad-oncomplete").result(timeout=20)
    finally:
        await client.close()
    assert ok == {"status": "completed", "result": "done", "error": None}
    assert bad == {"status": "failed", "result": None, "error": "failed on purpose"}


@workflow(name="big_result")
async def big_result(ctx: WorkflowContext, size: int) -> str:
    return "r" * size


@workflow(name="outcome_kind")
async def outcome_kind(ctx: WorkflowContext, outcome: RunOutcome) -> list[object]:
    error = outcome.error.type if outcome.error is not None else None
    return [outcome.status, len(outcome.result) if outcome.result else None, error]


async def test_a_hook_gets_a_large_result_itself_and_lifecycle_events_leave_it_out(
    client: Client, engine: Engine
) -> None:
    """Stored by reference (over 64 KiB), the result reached the hook as the reference, and
    lifecycle subscribers got it too, with result_omitted false."""
    async with running_worker(client, [big_result, outcome_kind]):
        feed = client.events(workflow="big_result", status="completed", from_start=True)
        handle = await client.start(big_result, 100_000, run_id="big-1", on_complete=outcome_kind)
        assert len(await handle.result(timeout=10)) == 100_000
        with anyio.fail_after(10):
            event = await anext(aiter(feed))
        assert event.result is None and event.result_omitted
        await wait_for(lambda: started(client, "big-1-oncomplete"), what="the hook's run")
        hook = client.handle("big-1-oncomplete")
        assert await hook.result(timeout=10) == ["completed", 100_000, None]


async def test_a_terminated_runs_outcome_says_terminated_as_describe_does(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, [closing, outcome_kind]):
        how = {"way": "terminate", "nap": 0}
        await client.start(closing, how, run_id="t-kind", on_complete=outcome_kind)
        await wait_for(lambda: _waiting(client, "t-kind"), what="the run waiting")
        await client.terminate("t-kind", "enough")
        await wait_for(lambda: started(client, "t-kind-oncomplete"), what="the hook's run")
        result = await client.handle("t-kind-oncomplete").result(timeout=10)
    described = await client.describe("t-kind")
    assert described.error is not None and described.error.type == "RunTerminated"
    assert result == ["terminated", None, "RunTerminated"]


async def _waiting(client: Client, run_id: str) -> bool:
    return (await client.describe(run_id)).status == "waiting"
