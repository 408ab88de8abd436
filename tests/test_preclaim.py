"""A new run's claim goes out beside the lookup of its start (``natflow._preclaim``): it
fences as a claim written after a read would, and one that meets a newer history falls
back to a whole read. A start delivered by a start consumer needs no lookup: the run's
first steps run while its claim is on its way, and nothing they do is recorded unless the
claim lands."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import anyio
import pytest
from natflow import Client, RunCancelled, WorkflowContext, workflow
from natflow import _preclaim as preclaim_module
from natflow_engine import HISTORY_STREAM, ServerUnavailable
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine.events import RunClaimed, RunCompleted, RunStarted, StepCompleted, utcnow

from tests.helpers import overheard, running_worker, start_pulls, wait_for

_STEPS = 2


async def _one(x: int) -> int:
    return x + 1


@workflow(name="preclaim_two_steps")
async def two_steps(ctx: WorkflowContext, x: int) -> int:
    for _ in range(_STEPS):
        x = await ctx.step("add", _one, x)
    return x


async def _long(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "done"


_STEP_BEGUN: dict[str, anyio.Event] = {}


async def _begin(key: str) -> str:
    _STEP_BEGUN.pop(key).set()
    return key


@workflow(name="preclaim_gated")
async def gated(ctx: WorkflowContext, key: str) -> str:
    return await ctx.step("begin", _begin, key)


@workflow(name="preclaim_busy")
async def busy(ctx: WorkflowContext, seconds: float) -> str:
    return await ctx.step("long", _long, seconds)


async def test_a_new_run_is_claimed_once_beside_its_read(client: Client) -> None:
    async with running_worker(client, [two_steps]) as worker:
        handle = await client.start(two_steps, 1, run_id="pre-1")
        assert await handle.result(timeout=10) == 3
    events = await client.history("pre-1")
    claims = [e for e in events if isinstance(e, RunClaimed)]
    assert [c.worker for c in claims] == [worker.identity]
    assert [type(e) for e in events[:2]] == [RunStarted, RunClaimed]
    assert sum(isinstance(e, StepCompleted) for e in events) == _STEPS


async def test_a_new_runs_start_is_looked_up_by_sequence_not_read_by_subject(
    client: Client,
) -> None:
    """A read by subject made the server walk every message stored since the run's start
    (most of its CPU under load); the start's one lookup by sequence does not."""
    direct_gets = f"$JS.API.DIRECT.GET.{HISTORY_STREAM}"
    async with overheard(client, direct_gets) as heard, running_worker(client, [two_steps]):
        handle = await client.start(two_steps, 1, run_id="pre-5")
        assert await handle.result(timeout=10) == 3
    requests: list[dict[str, Any]] = [json.loads(m.data) for m in heard]
    by_subject = [r for r in requests if "pre-5" in str(r.get("next_by_subj", ""))]
    assert by_subject == []
    lookups = [r["seq"] for r in requests if set(r) == {"seq"}]
    assert len(lookups) == 1
    store = HistoryStore(client.connection)
    assert await store.read_start("pre-5", lookups[0]) is not None  # the run's start
    events = (await store.read("pre-5")).events
    assert [type(e) for e in events[:2]] == [RunStarted, RunClaimed]


async def test_a_start_lookup_accepts_only_the_runs_own_first_start(client: Client) -> None:
    store = HistoryStore(client.connection)
    await client.start(two_steps, 1, run_id="pre-6")
    await client.start(two_steps, 2, run_id="pre-6-other")
    own = (await store.read("pre-6")).last_seq
    other = (await store.read("pre-6-other")).last_seq
    found = await store.read_start("pre-6", own)
    assert found is not None and found.last_seq == own
    assert [type(e) for e in found.events] == [RunStarted]
    assert await store.read_start("pre-6", other) is None  # another run's start
    assert await store.read_start("pre-6", other + 1000) is None  # nothing stored there
    claim = RunClaimed(id="pre-6:2", at=utcnow(), worker="w", delivery=1)
    claimed = await store.append("pre-6", claim, own)
    assert await store.read_start("pre-6", claimed) is None  # not a start
    # A restart's start is a new run's first event, but it is seeded from the old run's
    # history: it is never taken for a whole history.
    restart = RunStarted(
        id="pre-6-restart:1", at=utcnow(), workflow="w", queue="q", restarted_from="pre-6"
    )
    seq = await store.append("pre-6-restart", restart, 0)
    assert await store.read_start("pre-6-restart", seq) is None


async def test_a_claim_that_meets_a_newer_history_falls_back(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    handle = await client.start(two_steps, 1, run_id="pre-2")  # its task: start inline
    store = HistoryStore(client.connection)
    last = await store.last("pre-2")
    assert last is not None and isinstance(last[0], RunStarted)
    # Another worker claimed the run (and died) before this task is taken: the claim beside
    # the read expects the start as the run's last event, so it fails and the worker reads
    # the run again and claims after the other claim.
    other = RunClaimed(id="pre-2:2", at=utcnow(), worker="gone-worker", delivery=1)
    await store.append("pre-2", other, last[1])
    with caplog.at_level(logging.DEBUG, logger="natflow.worker"):
        async with running_worker(client, [two_steps]) as worker:
            assert await handle.result(timeout=10) == 3
    await _taken_after_gone_worker(client, "pre-2", worker.identity)
    assert any("claim beside the lookup did not hold" in r.getMessage() for r in caplog.records)


async def test_a_signal_stored_before_the_lease_exists_is_seen(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run is claimed, but its lease not yet written, when it is terminated: the engine
    # finds its task in flight and no lease, so it nudges no one. The worker's look for
    # signals must come after the lease (or a second look must), or the run's one-minute
    # step runs to its end before anyone reads the terminate.
    await _terminate_before_the_lease(client, engine, monkeypatch, "pre-3")
    assert not any(isinstance(e, StepCompleted) for e in await client.history("pre-3"))


async def test_a_nudge_before_the_execution_exists_is_kept(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's lease is written and its one look found nothing; a terminate stored now
    # finds the lease and the engine nudges this worker, before the worker has built the
    # run's execution. The nudge must not be dropped for want of an execution to tell.
    async with running_worker(client, [busy]) as worker:
        look = preclaim_module.last_signal_seq

        async def look_then_signal(conn: Any, run_id: str) -> int:
            seq = await look(conn, run_id)
            if run_id == "pre-4":
                await client.terminate(run_id, reason="after the look")

                async def nudged() -> bool:
                    return worker._held["pre-4"].nudged

                await wait_for(nudged, what="the nudge to reach the worker")
            return seq

        monkeypatch.setattr(preclaim_module, "last_signal_seq", look_then_signal)
        handle = await client.start(busy, 60, run_id="pre-4")
        with anyio.fail_after(20), pytest.raises(RunCancelled, match="after the look"):
            await handle.result(timeout=20)
    assert not any(isinstance(e, StepCompleted) for e in await client.history("pre-4"))


class _ClaimGate:
    """Holds the claim of one run in the worker's history store until ``released`` is set."""

    def __init__(self, worker: Any, run_id: str) -> None:
        self.released = anyio.Event()
        self.claims_held = 0
        self._append = worker._store.append
        self._run_id = run_id

    async def append(self, run_id: str, event: Any, *args: Any, **kwargs: Any) -> int:
        if run_id == self._run_id and isinstance(event, RunClaimed):
            self.claims_held += 1
            await self.released.wait()
        return int(await self._append(run_id, event, *args, **kwargs))


async def test_a_started_runs_first_step_runs_while_its_claim_is_on_its_way(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The claim is held back until the first step has begun: were the step to wait for the
    # claim (a round trip before it), neither would ever happen.
    async with running_worker(client, [gated]) as worker:
        await wait_for(lambda: start_pulls(client, "default", gated.name), what="start pulls")
        gate = _ClaimGate(worker, "ahead-1")
        monkeypatch.setattr(worker._store, "append", gate.append)
        _STEP_BEGUN["ahead-1"] = gate.released
        handle = await client.start(gated, "ahead-1", run_id="ahead-1")
        with anyio.fail_after(10):
            assert await handle.result(timeout=10) == "ahead-1"
    assert gate.claims_held == 1
    events = await client.history("ahead-1")
    assert [type(e) for e in events] == [RunStarted, RunClaimed, StepCompleted, RunCompleted]
    claims = [e.worker for e in events if isinstance(e, RunClaimed)]
    assert claims == [worker.identity]


async def test_a_claim_beside_the_first_steps_that_misses_records_nothing_of_them(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Another worker claims the run (and dies) while this one's claim is on its way: the
    # first step has run here meanwhile, but its outcome must not reach history; the run is
    # read anew, claimed after the other claim and finished, each step recorded once.
    store = HistoryStore(client.connection)
    calls: list[int] = []
    ran = anyio.Event()

    async def counted(x: int) -> int:
        calls.append(x)
        ran.set()
        return x + 1

    monkeypatch.setattr(sys.modules[__name__], "_one", counted)
    async with running_worker(client, [two_steps]) as worker:
        await wait_for(lambda: start_pulls(client, "default", two_steps.name), what="start pulls")
        append = worker._store.append

        async def claimed_first(run_id: str, event: Any, *args: Any, **kwargs: Any) -> int:
            if run_id == "ahead-2" and isinstance(event, RunClaimed) and event.id == "ahead-2:2":
                await ran.wait()  # the first step ran ahead of the claim
                other = RunClaimed(id="ahead-2:2", at=utcnow(), worker="gone-worker", delivery=1)
                await store.append("ahead-2", other, args[0])
            return int(await append(run_id, event, *args, **kwargs))

        monkeypatch.setattr(worker._store, "append", claimed_first)
        with caplog.at_level(logging.DEBUG, logger="natflow.worker"):
            handle = await client.start(two_steps, 1, run_id="ahead-2")
            assert await handle.result(timeout=10) == 3
    await _taken_after_gone_worker(client, "ahead-2", worker.identity)
    assert any("claim beside the first steps missed" in r.getMessage() for r in caplog.records)
    assert calls[0] == 1 and len(calls) == _STEPS + 1  # the first step ran twice


async def test_a_terminate_before_the_lease_stops_a_step_run_ahead_of_its_claim(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above (a signal stored before the lease exists), for a run from a start consumer:
    # its step is running already when the lease's one look finds the terminate.
    await _terminate_before_the_lease(client, engine, monkeypatch, "ahead-3", pulled=True)
    events = await client.history("ahead-3")
    assert [type(e) for e in events[:2]] == [RunStarted, RunClaimed]
    assert not any(isinstance(e, StepCompleted) for e in events)


async def test_a_busy_worker_claims_a_new_run_before_its_first_steps(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that holds other runs claims beside the lease and its look for signals, before
    # the run goes live (its claim joins the other runs' batch: throughput, not latency).
    looked: list[str] = []
    look = preclaim_module.last_signal_seq

    async def counted_look(conn: Any, run_id: str) -> int:
        looked.append(run_id)
        return await look(conn, run_id)

    monkeypatch.setattr(preclaim_module, "last_signal_seq", counted_look)
    async with running_worker(client, [busy, two_steps]) as worker:
        for workflow in (busy, two_steps):
            await wait_for(lambda w=workflow: start_pulls(client, "default", w.name), what="pulls")
        await client.start(busy, 60, run_id="ahead-busy")
        await wait_for(lambda: _holds(worker, "ahead-busy"), what="the busy run held")
        assert await (await client.start(two_steps, 1, run_id="ahead-4")).result(timeout=10) == 3
        assert looked == ["ahead-4"]  # the look beside the claim: claimed before going live
        await client.cancel("ahead-busy")
    events = await client.history("ahead-4")
    assert [type(e) for e in events[:3]] == [RunStarted, RunClaimed, StepCompleted]


async def test_written_puts_what_was_handed_over_on_the_wire(client: Client) -> None:
    # A step run beside its run's claim waits for this, not for a round trip.
    nc: Any = client.connection.nc
    await nc.publish("natflow.test.written", b"x")
    assert nc._pending_data_size > 0  # nats-py's flusher task has not run yet
    await client.connection.written()
    assert nc._pending_data_size == 0


async def test_written_keeps_a_cancellation(client: Client) -> None:
    # nats-py's forced flush swallows a cancellation; a step waiting on it must still stop.
    await client.connection.nc.publish("natflow.test.written", b"x")
    reached = False
    with anyio.CancelScope() as scope:
        scope.cancel()
        await client.connection.written()
        reached = True
    assert scope.cancelled_caught and not reached


async def _holds(worker: Any, run_id: str) -> bool:
    return run_id in worker._held


async def _taken_after_gone_worker(client: Client, run_id: str, identity: str) -> None:
    """The run's history: the gone worker's claim, then this worker's, and each step once."""
    events = await client.history(run_id)
    claims = [e.worker for e in events if isinstance(e, RunClaimed)]
    assert claims == ["gone-worker", identity]
    assert sum(isinstance(e, StepCompleted) for e in events) == _STEPS


async def _terminate_before_the_lease(
    client: Client,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    run_id: str,
    *,
    pulled: bool = False,
) -> None:
    """Start a one-minute step's run that is terminated just before its lease is written,
    and see it cancelled (``pulled``: taken from its start consumer, not as a task)."""
    async with running_worker(client, [busy]) as worker:
        if pulled:
            await wait_for(lambda: start_pulls(client, "default", busy.name), what="pulls")
        acquire = worker._leases.acquire

        async def late_acquire(leased: str, *args: Any, **kwargs: Any) -> Any:
            if leased == run_id:
                await client.terminate(run_id, reason="before the lease")
                await wait_for(_handled(engine), what="the engine to take the signal in")
            return await acquire(leased, *args, **kwargs)

        monkeypatch.setattr(worker._leases, "acquire", late_acquire)
        handle = await client.start(busy, 60, run_id=run_id)
        with anyio.fail_after(20), pytest.raises(RunCancelled, match="before the lease"):
            await handle.result(timeout=20)


def _handled(engine: Engine) -> Any:
    async def check() -> bool:
        return engine.signals.received >= 1

    return check


async def test_a_transient_failure_beside_the_first_steps_hands_the_run_back(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The server away (an append out of its retries) while the run's lease is written beside
    # its first steps: the run is handed back, as any transient error hands it back, and
    # finishes. Seen as an error group, it was logged as a failed task, which counts toward
    # parking the run.
    async with running_worker(client, [two_steps]) as worker:
        await wait_for(lambda: start_pulls(client, "default", two_steps.name), what="start pulls")
        append = worker._store.append
        failed: list[StepCompleted] = []

        async def away_once(run_id: str, event: Any, *args: Any, **kwargs: Any) -> int:
            if run_id == "away-1" and isinstance(event, StepCompleted) and not failed:
                failed.append(event)
                raise ServerUnavailable("lost the NATS connection (injected)")
            return int(await append(run_id, event, *args, **kwargs))

        monkeypatch.setattr(worker._store, "append", away_once)
        with caplog.at_level(logging.INFO, logger="natflow.worker"):
            handle = await client.start(two_steps, 1, run_id="away-1")
            assert await handle.result(timeout=30) == 3
    assert failed
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "natflow.worker"]
    assert (
        logging.WARNING,
        "run away-1: handing it back: lost the NATS connection (injected)",
    ) in said
    assert not [m for level, m in said if level >= logging.ERROR], said
