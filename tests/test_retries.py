"""Retries are durable: each failed attempt is recorded and the backoff is a durable timer."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from natflow import (
    Client,
    InvalidInput,
    RetryPolicy,
    RunFailed,
    StepError,
    StepTimeout,
    WorkflowContext,
    workflow,
)
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunClaimed, StepFailed, StepRetrying, StepStarted

from tests.helpers import (
    count_lines,
    replay_recorded,
    running_worker,
    spawn_worker,
    stop,
    wait_for,
)
from tests.workflows_replay import BACKOFF, COUNTS_ENV, GATE_ENV

TARGET = "tests.workflows_replay:make_worker"


async def test_a_worker_killed_during_a_backoff_neither_forgets_nor_hurries_the_retry(
    client: Client, nats_server: EmbeddedServer, engine: Engine, tmp_path: Path
) -> None:
    counts = tmp_path / "counts.txt"
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(tmp_path)}
    first = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-1.log")
    second = None
    try:
        handle = await client.start("flaky", run_id="flaky-1")

        async def retrying() -> bool:
            steps = await client.steps("flaky-1")
            return [(s.status, s.attempts) for s in steps] == [("retrying", 1)]

        await wait_for(retrying, timeout=20, what="attempt 1 recorded as retrying")
        info = await handle.status()
        assert info.status == "sleeping", info
        assert info.current is not None and "attempt 2 at" in info.current, info.current
        assert "card declined" in info.current
        stop(first, signal.SIGKILL)
        assert count_lines(counts) == Counter({"flaky-1:charge": 1})

        second = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-2.log")
        with pytest.raises(RunFailed, match="card declined"):
            await handle.result(timeout=30)
    finally:
        stop(first)
        if second is not None:
            stop(second)

    assert count_lines(counts) == Counter({"flaky-1:charge": 3}), "max_attempts=3 across a crash"
    history = await client.history("flaky-1")
    retries = [e for e in history if isinstance(e, StepRetrying)]
    assert [r.attempt for r in retries] == [1, 2]
    final = [e for e in history if isinstance(e, StepFailed)]
    assert [f.attempt for f in final] == [3]
    # Each attempt started no earlier than the time its predecessor recorded.
    starts = [r.started_at for r in retries[1:]] + [final[0].started_at]
    for retry, started in zip(retries, starts, strict=True):
        assert started >= retry.retry_at
        assert (retry.retry_at - retry.at).total_seconds() == pytest.approx(BACKOFF, abs=0.1)
    # The run was let go during each backoff: every attempt came with a new claim.
    assert sum(isinstance(e, RunClaimed) for e in history) == 3
    steps = await client.steps("flaky-1")
    assert [(s.status, s.attempts) for s in steps] == [("failed", 3)]


async def sleepy() -> None:
    import anyio

    await anyio.sleep(5)


@workflow(name="slow_charge")
async def slow_charge(ctx: WorkflowContext) -> None:
    policy = RetryPolicy(max_attempts=2, initial_interval=0.05, jitter=0)
    await ctx.step("charge", sleepy, retry=policy, timeout=0.2)


async def test_a_step_timeout_says_which_step_and_attempt(client: Client) -> None:
    async with running_worker(client, [slow_charge]):
        handle = await client.start(slow_charge, run_id="slow-1")
        with pytest.raises(RunFailed) as failed:
            await handle.result(timeout=10)
    error = failed.value.error
    assert "step 'charge' attempt 2 timed out after 0.2 s" in error.message, error
    assert (
        error.type == "StepTimeout"
    )  # what the docs name and `except` takes (not a private class)
    history = await client.history("slow-1")
    (retry,) = [e for e in history if isinstance(e, StepRetrying)]
    assert retry.error.type == "StepTimeout"
    assert retry.error.message == "step 'charge' attempt 1 timed out after 0.2 s"
    (final,) = [e for e in history if isinstance(e, StepFailed)]
    assert final.error.message == "step 'charge' attempt 2 timed out after 0.2 s"
    assert "contextlib" not in final.error.traceback, final.error.traceback
    assert not [e for e in history if isinstance(e, StepStarted) and e.attempt > 2]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"non_retryable": (42,)}, "non_retryable"),  # was an AttributeError at the failure
        ({"non_retryable": ValueError}, "non_retryable"),  # not a tuple: a TypeError then
        ({"non_retryable": ("ValueError")}, "non_retryable"),  # a str: read letter by letter
        ({"backoff_coefficient": "2"}, "backoff_coefficient"),
        ({"backoff_coefficient": float("nan")}, "backoff_coefficient"),
        ({"jitter": "x"}, "jitter"),
        ({"max_attempts": True}, "max_attempts"),
    ],
)
def test_a_retry_policy_is_checked_when_made_not_when_a_step_fails(
    arguments: dict[str, object], named: str
) -> None:
    with pytest.raises(InvalidInput, match=named):
        RetryPolicy(**arguments)  # type: ignore[arg-type]


def test_a_steep_backoff_stops_at_its_cap_instead_of_overflowing() -> None:
    policy = RetryPolicy(max_attempts=5000, backoff_coefficient=1e200, max_interval=30, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4999)] == [1.0, 30.0, 30.0, 30.0]


class Error(Exception):
    pass


class Outer:
    class Inner(Exception):
        pass


def test_non_retryable_matches_classes_as_classes_and_names_as_recorded() -> None:
    """A class was matched by its bare name (myapp's Error stopped every other Error's
    retries), and the qualified name an error's type is recorded under never matched."""
    import shutil

    from natflow import RetryPolicy

    by_class = RetryPolicy(max_attempts=3, non_retryable=(Error,))
    assert not by_class.retryable(Error())
    assert by_class.retryable(shutil.Error())  # another class of that name
    by_name = RetryPolicy(max_attempts=3, non_retryable=("Outer.Inner",))
    assert not by_name.retryable(Outer.Inner())
    module = RetryPolicy(max_attempts=3, non_retryable=(f"{__name__}.Outer.Inner",))
    assert not module.retryable(Outer.Inner())
    plain = RetryPolicy(max_attempts=3, non_retryable=("Inner", "KeyError"))
    assert not plain.retryable(Outer.Inner()) and not plain.retryable(KeyError())
    assert plain.retryable(ValueError())


_bodies = {"now": 0, "peak": 0}
_bodies_lock = threading.Lock()


def _hangs(seconds: float) -> str:
    with _bodies_lock:
        _bodies["now"] += 1
        _bodies["peak"] = max(_bodies["peak"], _bodies["now"])
    try:
        time.sleep(seconds)
        return "late"
    finally:
        with _bodies_lock:
            _bodies["now"] -= 1


@workflow(name="hangs_past_its_timeout")
async def hangs_past_its_timeout(ctx: WorkflowContext) -> str:
    policy = RetryPolicy(max_attempts=3, initial_interval=0.05, jitter=0)
    try:
        return await ctx.step("hangs", _hangs, 0.8, timeout=0.2, retry=policy)
    except StepError as exc:
        return exc.error.type


async def test_a_timed_out_sync_step_keeps_its_slot_until_its_thread_ends(
    client: Client, engine: Engine
) -> None:
    """Nothing stops a thread: a timed-out attempt's ran on while the retry started beside
    it, outside max_concurrent_steps (five bodies at once under a limit of one)."""
    async with running_worker(client, [hangs_past_its_timeout], max_concurrent_steps=1):
        handle = await client.start(hangs_past_its_timeout, run_id="hangs")
        assert await handle.result(timeout=30) == "StepTimeout"
    assert _bodies["peak"] == 1


@workflow(name="minds_its_timeouts")
async def minds_its_timeouts(ctx: WorkflowContext) -> dict[str, object]:
    import anyio

    async def slow() -> str:
        await anyio.sleep(5)
        return "never"

    try:
        await ctx.step("slow", slow, timeout=0.2, retry=RetryPolicy(max_attempts=2, jitter=0))
    except StepTimeout as exc:
        assert isinstance(exc, StepError) and isinstance(exc, TimeoutError)
        return {"attempt": exc.attempt, "seconds": exc.seconds, "type": exc.error.type}
    return {}


async def test_a_step_whose_last_attempt_timed_out_raises_step_timeout(
    client: Client, engine: Engine
) -> None:
    """It raised a plain StepError: `except StepTimeout` never matched."""
    async with running_worker(client, [minds_its_timeouts]):
        handle = await client.start(minds_its_timeouts, run_id="minds")
        expected = {"attempt": 2, "seconds": 0.2, "type": "StepTimeout"}
        assert await handle.result(timeout=30) == expected
    replayed = await replay_recorded(client, minds_its_timeouts, "minds")
    assert replayed.divergence is None and replayed.result == expected


def _naps(seconds: float) -> str:
    time.sleep(seconds)
    return "done"


@workflow(name="sync_fan_out_with_timeouts")
async def sync_fan_out_with_timeouts(ctx: WorkflowContext, n: int) -> list[str]:
    return list(await ctx.parallel(*(ctx.step("nap", _naps, 0.3, timeout=0.6) for _ in range(n))))


async def test_a_sync_steps_timeout_starts_when_it_runs_not_while_it_waits_for_a_slot(
    client: Client, engine: Engine
) -> None:
    """The wait for a step slot (or a worker thread) counted toward the timeout: six 0.3 s
    bodies with a 0.6 s timeout under max_concurrent_steps=2 timed out four."""
    async with running_worker(client, [sync_fan_out_with_timeouts], max_concurrent_steps=2):
        handle = await client.start(sync_fan_out_with_timeouts, 6, run_id="fan-timeouts")
        assert await handle.result(timeout=30) == ["done"] * 6
