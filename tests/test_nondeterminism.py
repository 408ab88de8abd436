"""Code changed under a running workflow: the run is held as blocked, then resumes."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest
from natflow import Client, NonDeterminismError, RunCancelled, Workflow, WorkflowContext, workflow
from natflow.testing import Replayer
from natflow_engine._engine import Engine
from natflow_engine.events import RunBlocked, RunClaimed, StepCompleted

from tests.helpers import running_worker, wait_for


def versioned(order: tuple[str, ...], gates: dict[str, anyio.Event], ran: list[str]) -> Workflow:
    """One version of the workflow named "versioned": its steps in ``order``.

    A step whose name is in ``gates`` waits for that event before returning.
    """

    async def body(name: str) -> str:
        ran.append(name)
        gate = gates.get(name)
        if gate is not None:
            await gate.wait()
        return name.upper()

    @workflow(name="versioned")
    async def run(ctx: WorkflowContext) -> list[str]:
        return [await ctx.step(name, body, name) for name in order]

    return run


async def step_states(client: Client, run_id: str) -> list[tuple[str, str]]:
    return [(s.name, s.status) for s in await client.steps(run_id)]


async def stop_version_a_in(client: Client, version: Workflow, run_id: str, step: str) -> None:
    """Start the run on a version-A worker and stop that worker while ``step`` is running."""
    async with running_worker(client, [version]):
        await client.start(version, run_id=run_id)

        async def in_step() -> bool:
            return (step, "running") in await step_states(client, run_id)

        await wait_for(in_step, what=f"step {step!r} to be recorded as running")


async def held_by_version_b(client: Client, version: Workflow, run_id: str) -> None:
    """Serve the run with version B until it is held (or, wrongly, closed)."""
    async with running_worker(client, [version]):

        async def held_or_closed() -> bool:
            info = await client.describe(run_id)
            return info.status == "blocked" or info.is_closed

        await wait_for(held_or_closed, what="the run to be held as blocked")
    info = await client.describe(run_id)
    assert info.status == "blocked", (
        f"version B was not held: status {info.status!r}, steps {await step_states(client, run_id)}"
    )


def check_block_error(info_error: object, run_id: str) -> None:
    assert info_error is not None
    error_type = getattr(info_error, "type", None)
    message = getattr(info_error, "message", "")
    assert error_type == "NonDeterminismError"
    expected = str(NonDeterminismError(run_id, 2, "step 'c'", "step 'b'"))
    assert message == expected
    for part in (repr(run_id), "position 2", "step 'c'", "step 'b'"):
        assert part in message


async def test_reordered_steps_after_a_recorded_step_hold_the_run_until_old_code_returns(
    client: Client,
) -> None:
    run_id = "nd-recorded"
    release_c = anyio.Event()
    ran: list[str] = []
    version_a = versioned(("a", "b", "c"), {"c": release_c}, ran)
    version_b = versioned(("a", "c", "b"), {}, ran)

    # Version A records a and b, then is stopped inside c.
    await stop_version_a_in(client, version_a, run_id, "c")
    assert ran == ["a", "b", "c"]
    before = len(await client.history(run_id))

    # Version B asks for c where history recorded b: held, not failed, nothing else written.
    await held_by_version_b(client, version_b, run_id)
    info = await client.describe(run_id)
    check_block_error(info.error, run_id)
    assert info.current is not None and "blocked" in info.current
    history = await client.history(run_id)
    assert [type(e) for e in history[before:]] == [RunBlocked]
    assert ran == ["a", "b", "c"], "version B ran a step of a run it cannot replay"

    # Version A again: it replays a and b, runs c, and completes.
    release_c.set()
    async with running_worker(client, [version_a]):
        assert await client.handle(run_id).result(timeout=15) == ["A", "B", "C"]
    history = await client.history(run_id)
    completed = Counter(e.name for e in history if isinstance(e, StepCompleted))
    assert completed == Counter({"a": 1, "b": 1, "c": 1})
    assert ran == ["a", "b", "c", "c"]  # c was cut off by the first stop, then ran once
    assert sum(isinstance(e, RunClaimed) for e in history) == 2  # A, then A again; never B
    info = await client.describe(run_id)
    assert info.status == "completed" and info.error is None


async def test_reordered_steps_at_a_started_but_unrecorded_step_hold_the_run(
    client: Client,
) -> None:
    """History records that step b was running at position 2 (step_started); code that asks
    for c there does not match that history either, and must not run c in b's place."""
    run_id = "nd-started"
    release_b = anyio.Event()
    ran: list[str] = []
    version_a = versioned(("a", "b", "c"), {"b": release_b}, ran)
    version_b = versioned(("a", "c", "b"), {}, ran)

    await stop_version_a_in(client, version_a, run_id, "b")
    assert ran == ["a", "b"]

    await held_by_version_b(client, version_b, run_id)
    check_block_error((await client.describe(run_id)).error, run_id)
    assert ran == ["a", "b"], "version B ran steps of a run it cannot replay"

    release_b.set()
    async with running_worker(client, [version_a]):
        assert await client.handle(run_id).result(timeout=15) == ["A", "B", "C"]
    history = await client.history(run_id)
    completed = Counter(e.name for e in history if isinstance(e, StepCompleted))
    assert completed == Counter({"a": 1, "b": 1, "c": 1})


async def test_a_run_held_for_incompatible_code_ends_when_terminated(
    client: Client, engine: Engine
) -> None:
    """A terminate (or cancel) of a run blocked by incompatible code waited for compatible
    code to come back, which may never: the run could not be stopped, nor deleted."""
    run_id = "nd-stopped"
    ran: list[str] = []
    version_a = versioned(("a", "b", "c"), {"c": anyio.Event()}, ran)
    version_b = versioned(("a", "c", "b"), {}, ran)
    await stop_version_a_in(client, version_a, run_id, "c")
    await held_by_version_b(client, version_b, run_id)
    async with running_worker(client, [version_b]):  # still the incompatible code
        await client.terminate(run_id, "giving up on it")
        with pytest.raises(RunCancelled, match="terminated: stopped while blocked"):
            await client.handle(run_id).result(timeout=10)
    assert (await client.describe(run_id)).status == "terminated"
    await client.delete(run_id)


async def test_code_that_raises_in_replay_is_named_not_taken_for_a_removed_step(
    client: Client,
) -> None:
    """Code that raises before asking for a recorded step (here: its input annotation no
    longer fits the recorded input) was reported as asking for "nothing more", as if the
    step had been removed; the error itself was nowhere."""
    ran: list[str] = []
    version_a = versioned(("a",), {}, ran)
    async with running_worker(client, [version_a]):
        handle = await client.start(version_a, run_id="nd-raises")
        assert await handle.result(timeout=10) == ["A"]

    @workflow(name="versioned")
    async def strict(ctx: WorkflowContext) -> list[str]:
        raise RuntimeError("the new code cannot start")

    replay = await Replayer([strict]).replay_run(client, "nd-raises")
    assert replay.divergence is not None
    assert "it raised RuntimeError: the new code cannot start" in str(replay.divergence)
