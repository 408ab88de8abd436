"""User code that raises BaseException or kills its process never takes the fleet down."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest
from natflow import Client
from natflow import RunFailed as RunFailedError
from natflow_engine._registry import list_workers
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunBlocked, RunFailed, RunReleased, StepFailed

from tests.helpers import running_worker, spawn_worker, start_pulls, stop, wait_for
from tests.workflows_poison import COUNTS_ENV, awaits_a_thread, not_text

TARGET = "tests.workflows_poison:make_worker"


def counts(path: Path) -> Counter[str]:
    """Executions per ``run:step`` (the worker's pid left out)."""
    if not path.exists():
        return Counter()
    return Counter(line.rsplit(":", 1)[0] for line in path.read_text().splitlines())


async def workers_up(client: Client, n: int) -> None:
    async def registered() -> bool:
        return len(await list_workers(client.connection)) >= n

    await wait_for(registered, timeout=30, what=f"{n} workers registered")


def spawn(server: EmbeddedServer, tmp_path: Path, n: int) -> list[subprocess.Popen[bytes]]:
    env = {COUNTS_ENV: str(tmp_path / "counts.txt")}
    return [
        spawn_worker(server.url, TARGET, env=env, log=tmp_path / f"worker-{i}.log")
        for i in range(n)
    ]


async def test_base_exceptions_from_steps_and_workflows_are_failures_not_exits(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    procs = spawn(nats_server, tmp_path, 2)
    try:
        await workers_up(client, 2)
        runs = {
            "exit": await client.start("base_steps", "exit", run_id="b-exit"),
            "interrupt": await client.start("base_steps", "interrupt", run_id="b-interrupt"),
            "base": await client.start("base_steps", "base", run_id="b-base"),
            "cancelled": await client.start("base_steps", "cancelled", run_id="b-cancelled"),
            "unprintable": await client.start("base_steps", "unprintable", run_id="b-unprint"),
            "genexit": await client.start("base_steps", "genexit", run_id="b-genexit"),
        }
        unprintable_end = await client.start("unprintable_end", 0, run_id="b-unprint-end")
        itself = await client.start("exits_itself", 4, run_id="b-itself")
        for kind, handle in runs.items():
            info = await wait_for(
                lambda h=handle: _closed(client, h.run_id), timeout=30, what=f"{kind} closed"
            )
            assert info.status == "failed", info
            failed = [e for e in await client.history(handle.run_id) if isinstance(e, StepFailed)]
            assert [e.error.type for e in failed] == [
                {
                    "exit": "SystemExit",
                    "interrupt": "KeyboardInterrupt",
                    "base": "Custom",
                    "cancelled": "CancelledError",
                    "unprintable": "Unprintable",
                    "genexit": "GeneratorExit",
                }[kind]
            ]
            if kind == "unprintable":
                assert "cannot be shown: str() raised RuntimeError" in failed[0].error.message
        info = await wait_for(
            lambda: _closed(client, unprintable_end.run_id), timeout=30, what="unprintable end"
        )
        assert info.status == "failed" and info.error is not None, info
        assert info.error.type == "Unprintable"
        info = await wait_for(lambda: _closed(client, itself.run_id), timeout=30, what="itself")
        assert info.status == "failed" and info.error is not None
        assert info.error.type == "SystemExit"
        ends = [e for e in await client.history(itself.run_id) if isinstance(e, RunFailed)]
        assert len(ends) == 1
        # Both workers are still up, and a run started afterwards completes.
        assert [p.poll() for p in procs] == [None, None]
        good = await client.start("doubler", 21, run_id="b-good")
        assert await good.result(timeout=30) == 42
        # Each misbehaving step ran once: no worker died and took it again.
        assert counts(tmp_path / "counts.txt") == Counter(
            {
                "b-exit:exits": 1,
                "b-interrupt:interrupts": 1,
                "b-base:raises_base": 1,
                "b-cancelled:cancels_itself": 1,
                "b-unprint:unprintable": 1,
                "b-genexit:generator_exit": 1,
                "b-itself:double": 1,
                "b-good:double": 1,
            }
        )
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


async def _closed(client: Client, run_id: str) -> object:
    info = await client.describe(run_id)
    return info if info.is_closed or info.status == "blocked" else None


async def test_a_run_that_kills_three_workers_is_held_as_poisoned(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """Three deaths: a quick step that kills its process leaves no ``step_started``, so
    history cannot tell it from a run whose workers died of something else (under churn,
    two such deaths in a row held innocent runs forever)."""
    procs = spawn(nats_server, tmp_path, 4)
    try:
        await workers_up(client, 4)
        # Taken from its start consumer by an idle worker, which claims it beside the step:
        # the claim must be on the wire before the step ends the process, or that death
        # would not count (and the third worker would die too).
        await wait_for(lambda: start_pulls(client, "default", "poison"), what="start pulls")
        await client.start("poison", 0, run_id="p-1")
        info = await wait_for(lambda: _closed(client, "p-1"), timeout=60, what="p-1 held")
        assert info.status == "blocked"
        assert info.error is not None and info.error.type == "PoisonedRun"
        assert "died 3 times" in info.error.message
        blocked = [e for e in await client.history("p-1") if isinstance(e, RunBlocked)]
        assert len(blocked) == 1
        # Three workers died, the fourth holds the run as poisoned and keeps serving.
        assert sorted(p.poll() is None for p in procs) == [False, False, False, True]
        assert counts(tmp_path / "counts.txt") == Counter({"p-1:kills": 3})
        good = await client.start("doubler", 5, run_id="p-good")
        assert await good.result(timeout=30) == 10
        # The held run can still be ended.
        await client.terminate("p-1", "operator gave up")

        async def terminated() -> bool:
            return (await client.describe("p-1")).status == "terminated"

        await wait_for(terminated, timeout=20, what="p-1 terminated")
        assert counts(tmp_path / "counts.txt")["p-1:kills"] == 3
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


async def test_text_no_event_could_hold_fails_the_run_instead_of_blocking_it(
    client: Client, engine: object
) -> None:
    """A lone surrogate cannot be written as UTF-8: a step name holding one blocked its run
    (every append refused, the task retried until parked); an error message holding one
    (a file name that was not UTF-8) the same. The name is refused, the message escaped."""
    async with running_worker(client, [not_text]):
        named = await client.start(not_text, "step_name", run_id="odd-step-name")
        with pytest.raises(RunFailedError) as failed:
            await named.result(timeout=10)
        assert failed.value.error.type == "InvalidInput"
        assert "no lone surrogates" in failed.value.error.message
        listed = await client.start(not_text, "error", run_id="odd-error")
        with pytest.raises(RunFailedError) as failed:
            await listed.result(timeout=10)
        assert "report-\\udcff.csv" in failed.value.error.message, failed.value.error


async def test_a_workflow_awaiting_a_thread_fails_saying_why_and_no_thread_dies(
    client: Client, engine: object
) -> None:
    """The thread's wake-up raised in that thread ("Exception in thread AnyIO worker thread",
    a traceback in the log, the thread gone)."""
    import threading

    died: list[threading.ExceptHookArgs] = []
    before, threading.excepthook = threading.excepthook, died.append
    try:
        async with running_worker(client, [awaits_a_thread]):
            handle = await client.start(awaits_a_thread, 0, run_id="awaits-a-thread")
            with pytest.raises(RunFailedError, match="awaits something natflow cannot deliver"):
                await handle.result(timeout=10)
            await anyio.sleep(0.2)  # the thread's own end, had it raised
    finally:
        threading.excepthook = before
    assert died == []


async def test_a_run_whose_workers_die_twice_of_something_else_still_completes(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """Two workers SIGKILLed in turn (an OOM killer, lost nodes) while the run's step ran:
    the next worker held it as poisoned, for good."""
    env = {COUNTS_ENV: str(tmp_path / "counts.txt")}
    procs: list[subprocess.Popen[bytes]] = []

    async def ran(n: int) -> bool:
        return counts(tmp_path / "counts.txt")["churn:slow"] >= n

    try:
        handle = None
        for death in (1, 2):
            procs.append(spawn_worker(nats_server.url, TARGET, env=env))
            if handle is None:
                await workers_up(client, 1)
                handle = await client.start("slow_step", 0, run_id="churn")
            await wait_for(lambda n=death: ran(n), timeout=30, what=f"step run {death}")
            stop(procs[-1], signal.SIGKILL)
        procs.append(spawn_worker(nats_server.url, TARGET, env=env))
        assert handle is not None
        assert await handle.result(timeout=30) == 1
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


@pytest.mark.slow
async def test_graceful_stops_during_a_long_step_never_hold_its_run_as_poisoned(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """Rolling deploys: each worker is stopped (SIGTERM) past its grace while a long step
    runs. Each release is recorded, so the three stops are not three deaths (the run was
    held as PoisonedRun at the fourth worker)."""
    env = {COUNTS_ENV: str(tmp_path / "counts.txt")}
    handle = await client.start("long_runner", 120, run_id="deployed")
    for n in range(1, 5):
        worker = spawn_worker(
            nats_server.url, TARGET, "--grace", "0.2", env=env, log=tmp_path / f"w{n}.log"
        )

        async def started(n: int = n) -> bool:
            return counts(tmp_path / "counts.txt")["deployed:long_step"] >= n

        try:
            await wait_for(started, timeout=30, what=f"the long step started by worker {n}")
            info = await client.describe("deployed")
            assert info.status == "running", info
        finally:
            stop(worker, signal.SIGTERM)
            worker.wait(timeout=20)
    released = [e for e in await client.history("deployed") if isinstance(e, RunReleased)]
    assert len(released) == 4, released
    assert (await client.describe("deployed")).status == "pending"
    await client.terminate(handle.run_id, "done testing")


@pytest.mark.slow
async def test_a_stopped_worker_releases_and_hands_back_every_run_it_holds(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """`natflow worker` cancelled its own shutdown as the grace ended: one or two of its runs
    were released and handed back, the others waited for their leases and counted as
    deaths (blocked as poisoned after three rolling restarts)."""
    env = {COUNTS_ENV: str(tmp_path / "counts.txt")}
    ids = [f"held-{i}" for i in range(20)]
    for run_id in ids:
        await client.start("long_runner", 120, run_id=run_id)
    worker = spawn_worker(
        nats_server.url, TARGET, "--grace", "0.2", env=env, log=tmp_path / "w.log"
    )

    async def all_started() -> bool:
        found = counts(tmp_path / "counts.txt")
        return all(found[f"{run_id}:long_step"] >= 1 for run_id in ids)

    try:
        await wait_for(all_started, timeout=30, what="the long steps running")
    finally:
        stop(worker, signal.SIGTERM)
        worker.wait(timeout=20)
    for run_id in ids:
        events = await client.history(run_id)
        assert [e for e in events if isinstance(e, RunReleased)], run_id
        await client.terminate(run_id, "done testing")


@pytest.mark.slow
async def test_a_stopping_worker_exits_though_a_sync_step_outlives_its_grace(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """A sync step's thread cannot be stopped: it kept the process alive to its end, and a
    second SIGTERM or Ctrl-C was ignored. The run is handed back, the process exits."""
    env = {COUNTS_ENV: str(tmp_path / "counts.txt")}

    async def started(n: int) -> bool:
        return counts(tmp_path / "counts.txt")["stuck:sleeps_in_a_thread"] >= n

    await client.start("thread_sleeper", 120, run_id="stuck")
    worker = spawn_worker(nats_server.url, TARGET, "--grace", "1", env=env, log=tmp_path / "w1.log")
    again = None
    try:
        await wait_for(lambda: started(1), timeout=30, what="the sync step running")
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: worker.wait(timeout=40)) == 0
        assert time.monotonic() - began < 30  # grace, unwinding, 10 s for threads at most
        # A second signal ends it at once.
        log = tmp_path / "w2.log"
        again = spawn_worker(nats_server.url, TARGET, "--grace", "60", env=env, log=log)
        await wait_for(lambda: started(2), timeout=30, what="the step running again elsewhere")
        again.send_signal(signal.SIGINT)
        await anyio.sleep(0.5)
        began = time.monotonic()
        again.send_signal(signal.SIGINT)
        code = await anyio.to_thread.run_sync(lambda: again.wait(timeout=10))
        assert code == 128 + signal.SIGINT and time.monotonic() - began < 5
    finally:
        for proc in (worker, again):
            if proc is not None:
                stop(proc, signal.SIGKILL)
    await client.terminate("stuck", "done testing")
