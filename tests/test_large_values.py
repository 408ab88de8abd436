"""Values of any size up to max_value_bytes: large ones in the natflow_values object store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from base64 import b64encode
from collections import Counter
from pathlib import Path

import msgspec
import nats
import pytest
from natflow import (
    AesGcmCodec,
    Client,
    InvalidInput,
    RunFailed,
    RunNotFound,
    WorkflowContext,
    workflow,
)
from natflow_engine import INLINE_BYTES
from natflow_engine._engine import Engine
from natflow_engine._sealing import ENV_KEYS
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunStarted, StepCompleted

from tests.helpers import ROOT, count_lines, running_worker, spawn_worker, stop, wait_for
from tests.workflows_recorded import recorded_values
from tests.workflows_values import BLOB_ENV, COUNTS_ENV, big_values, blob, digest, too_big_step

TARGET = "tests.workflows_values:make_worker"
BLOB_MB = 50
MiB = 1024 * 1024


async def stream_messages(url: str, stream: str) -> list[bytes]:
    """The bodies of every message in ``stream``, read with plain nats-py."""
    nc = await nats.connect(url)
    found: list[bytes] = []
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(stream)
        for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
            try:
                found.append((await jsm.get_msg(stream, seq)).data or b"")
            except nats.js.errors.NotFoundError:
                continue
    finally:
        await nc.close()
    return found


async def object_count(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jsm().stream_info("OBJ_natflow_values")
        return int(info.state.messages)
    finally:
        await nc.close()


async def _status(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


@pytest.mark.slow
async def test_large_input_step_result_and_signal_round_trip_across_a_worker_kill(
    client: Client, engine: Engine, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    counts = tmp_path / "counts.txt"
    env = {BLOB_ENV: str(BLOB_MB), COUNTS_ENV: str(counts)}
    url = nats_server.url
    data = blob(10 * MiB, "input")
    more = blob(5 * MiB, "signal")
    first = spawn_worker(url, TARGET, env=env, log=tmp_path / "worker-1.log")
    second = None
    try:
        handle = await client.start(big_values, data, run_id="big-1")
        await wait_for(lambda: _status(client, "big-1", "waiting"), timeout=120, what="the blob")
        stop(first, signal.SIGKILL)
        assert first.returncode == -signal.SIGKILL
        await client.signal("big-1", "more", more)
        second = spawn_worker(url, TARGET, env=env, log=tmp_path / "worker-2.log")
        result = await handle.result(timeout=180)
    finally:
        for proc in (first, second):
            if proc is not None:
                stop(proc)
    made = blob(BLOB_MB * MiB, "step")
    assert result == {
        "input": [len(data), digest(data)],
        "blob": [len(made), digest(made)],
        "signal": [len(more), digest(more)],
        "echo": more,
    }
    assert count_lines(counts) == Counter({"blob": 1})  # replayed from the store, not rerun
    steps = await client.steps("big-1")
    assert [s.name for s in steps] == ["blob"] and steps[0].result == made
    started = (await client.history("big-1"))[0]
    assert isinstance(started, RunStarted)
    assert msgspec.json.decode(started.input) == data
    # History (and the signal stream) hold references, each message small.
    history = await stream_messages(url, "NATFLOW_HISTORY")
    assert max(len(m) for m in history) <= INLINE_BYTES
    assert sum(b'"$natflow_ref"' in m for m in history) == 4  # input, blob, signal, result
    signals = await stream_messages(url, "NATFLOW_SIGNALS")
    assert signals and max(len(m) for m in signals) <= INLINE_BYTES


async def test_a_value_over_max_value_bytes_is_refused_and_nothing_is_written(
    engine: Engine, nats_server: EmbeddedServer
) -> None:
    client = await Client.connect(nats_server.url, max_value_bytes=MiB)
    try:
        with pytest.raises(InvalidInput, match=r"input of run 'over-1' is \d+ bytes.*max_value"):
            await client.start(big_values, blob(2 * MiB, "x"), run_id="over-1")
        with pytest.raises(RunNotFound):
            await client.describe("over-1")
        with pytest.raises(InvalidInput, match=r"payload of signal 'more'.*max_value_bytes"):
            await client.signal("anyone-1", "more", blob(2 * MiB, "x"))
        async with running_worker(client, [too_big_step]):
            handle = await client.start(too_big_step, 2.0, run_id="over-2")
            with pytest.raises(RunFailed, match=r"result of step 'huge'.*max_value_bytes"):
                await handle.result(timeout=30)
        assert await object_count(nats_server.url) == 0
        # Under the limit but over the inline threshold: stored, by reference.
        handle = await client.start(big_values, blob(INLINE_BYTES + 1, "y"), run_id="ok-1")
        assert await object_count(nats_server.url) > 0
        started = (await client.history("ok-1"))[0]
        assert isinstance(started, RunStarted)
        assert msgspec.json.decode(started.input) == blob(INLINE_BYTES + 1, "y")
    finally:
        await client.close()


def runs_show(url: str, run_id: str, keys: str | None) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(ENV_KEYS, None)
    if keys is not None:
        env[ENV_KEYS] = keys
    command = [sys.executable, "-m", "natflow_engine", "--url", url, "runs", "show", run_id]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_large_values_are_sealed_in_the_store_and_shown_by_the_cli(
    engine: Engine, nats_server: EmbeddedServer
) -> None:
    key = bytes(range(32))
    client = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": key}, current="k1"))
    try:
        async with running_worker(client, [too_big_step]):
            handle = await client.start(too_big_step, 0.1, run_id="sealed-1")
            made = blob(int(0.1 * MiB), "step")
            assert await handle.result(timeout=30) == made[:10]
        steps = await client.steps("sealed-1")
        assert steps[0].result == made
    finally:
        await client.close()
    chunks = b"".join(await stream_messages(nats_server.url, "OBJ_natflow_values"))
    assert b"$natflow_encrypted" in chunks and made[:64].encode() not in chunks
    history = b"".join(await stream_messages(nats_server.url, "NATFLOW_HISTORY"))
    assert b'"$natflow_ref"' in history
    with_key = runs_show(nats_server.url, "sealed-1", f"k1:{b64encode(key).decode()}")
    assert made[:40] in with_key
    assert "encrypted (key k1)" in runs_show(nats_server.url, "sealed-1", None)


async def test_a_large_input_started_through_the_engine(
    engine: Engine, nats_server: EmbeddedServer
) -> None:
    client = await Client.connect(nats_server.url, start_via_engine=True)
    try:
        text = "natflow " * 160000  # 1.2 MiB: over the server's max payload for a request
        async with running_worker(client, [recorded_values]):
            handle = await client.start(recorded_values, text, run_id="via-1")
            assert await handle.result(timeout=30) == {
                "input": len(text),
                "grown": len(text),
                "head": text.upper()[:16],
            }
    finally:
        await client.close()


async def test_a_step_result_that_only_sealing_takes_over_the_limit_fails_the_step(
    engine: Engine, nats_server: EmbeddedServer
) -> None:
    codec = AesGcmCodec({"k1": bytes(range(32))}, current="k1")
    client = await Client.connect(nats_server.url, codec=codec, max_value_bytes=MiB)
    try:
        async with running_worker(client, [too_big_step]):
            handle = await client.start(too_big_step, 0.9, run_id="grows-1")  # sealed: 1.2 MiB
            with pytest.raises(RunFailed, match=r"result of step 'huge'.*max_value_bytes"):
                await handle.result(timeout=30)
        assert await object_count(nats_server.url) == 0
    finally:
        await client.close()


@workflow(name="big_last_step")
async def big_last_step(ctx: WorkflowContext, size: int) -> int:
    value = await ctx.step("big", lambda n: "x" * n, size)  # the last step: carried by the end
    return len(value)


async def test_a_large_last_step_result_carried_by_the_runs_end_is_stored_by_reference(
    client: Client, nats_server: EmbeddedServer
) -> None:
    size = INLINE_BYTES + 1000
    async with running_worker(client, [big_last_step]):
        handle = await client.start(big_last_step, size, run_id="big-last")
        assert await handle.result(timeout=20) == size
    assert await object_count(nats_server.url) > 0  # the step's value went to the store
    history = await client.history("big-last")
    step = next(e for e in history if isinstance(e, StepCompleted))
    assert msgspec.json.decode(step.result) == "x" * size  # read back in its place
    stored = await stream_messages(nats_server.url, "NATFLOW_HISTORY")
    assert max(len(m) for m in stored) < INLINE_BYTES  # no message holds it inline
    # Deleted, the run leaves nothing in the store (nats-py's "deleted" meta message stayed,
    # ~400 bytes a value, for good).
    await client.delete("big-last")
    assert await object_count(nats_server.url) == 0


async def test_releasing_a_value_that_was_marked_but_never_stored_deletes_nothing_and_fails_not(
    client: Client,
) -> None:
    # A writer marks a value as its run's before it stores it: one that died in between (or
    # whose store write failed) leaves a marker naming no object. Deleting the run then
    # failed at every try ("could not be deleted from the natflow_values object store").
    from natflow_engine._streams import ensure_streams
    from natflow_engine._value_refs import mark
    from natflow_engine._value_release import release_run_values
    from natflow_engine._values import delete_object

    conn = client.connection
    await ensure_streams(conn)
    never_stored = "0" * 64
    await mark(conn, never_stored, "died-mid-write")
    assert await release_run_values(conn, "died-mid-write") == 1  # the marker's object: gone
    await delete_object(conn, never_stored)  # and again: what is gone stays gone
