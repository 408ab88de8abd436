"""Payload encryption: nothing readable reaches JetStream; keys rotate; no key, no loss."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from base64 import b64encode
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from natflow import (
    AesGcmCodec,
    Client,
    InvalidInput,
    MissingKey,
    RetryPolicy,
    RunFailed,
    StepError,
    WorkflowContext,
    workflow,
)
from natflow.testing import Replayer
from natflow_engine import RunNotFound, open_events, open_sealed, sealed_key
from natflow_engine._engine import Engine
from natflow_engine._sealing import seal
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import dead_letters, send
from natflow_engine._triggers import declarations, event_run_id
from natflow_engine.events import RunCompleted, RunStarted, StepRetrying, decode_event

from tests.console_helpers import http, served_console
from tests.helpers import ROOT, running_worker, wait_for

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
SECRETS = (
    "INPUT-S3CRET",
    "STEP-S3CRET",
    "SIGNAL-S3CRET",
    "ERROR-S3CRET",
    "RESULT-S3CRET",
    "LAST-S3CRET",
)


def fail(text: str) -> None:
    raise ValueError(text)


@workflow(name="confidential")
async def confidential(ctx: WorkflowContext, data: dict[str, str]) -> dict[str, Any]:
    echoed = await ctx.step("echo", lambda s: f"STEP-S3CRET {s}", data["secret"])
    try:
        await ctx.step("boom", fail, "ERROR-S3CRET in a message", retry=RetryPolicy())
    except StepError as exc:
        caught = exc.error.message
    signal = await ctx.wait_for_signal("approve", timeout=30)
    return {"echo": echoed, "caught": caught, "signal": signal, "result": "RESULT-S3CRET"}


@workflow(name="sealed_tail")
async def sealed_tail(ctx: WorkflowContext, data: str) -> str:
    # Its last step's outcome is stored with the run's end, in one message: sealed there too.
    return await ctx.step("tail", lambda s: f"LAST-S3CRET {s}", data)


@workflow(name="doomed")
async def doomed(ctx: WorkflowContext, data: str) -> None:
    raise ValueError(f"ERROR-S3CRET of the run: {data}")


_tries: dict[str, int] = {}


def flaky(secret: str) -> str:
    _tries[secret] = _tries.get(secret, 0) + 1
    if _tries[secret] == 1:
        raise RuntimeError(f"RETRY-S3CRET first attempt for {secret}")
    return "ok"


@workflow(name="sealed_retry", on_event="sealed.order")
async def sealed_retry(ctx: WorkflowContext, data: dict[str, str]) -> str:
    retry = RetryPolicy(max_attempts=3, initial_interval=0.2)
    return str(await ctx.step("flaky", flaky, data["secret"], retry=retry))


async def stored_messages(url: str) -> list[bytes]:
    """Every message (headers included) of every natflow stream, read with plain nats-py."""
    nc = await nats.connect(url)
    found: list[bytes] = []
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                try:
                    msg = await jsm.get_msg(info.config.name, seq)
                except nats.js.errors.NotFoundError:
                    continue
                found.append(f"{msg.subject} {msg.headers!r} ".encode() + (msg.data or b""))
    finally:
        await nc.close()
    return found


async def test_no_plaintext_of_inputs_results_errors_or_signals_reaches_jetstream(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    codec = AesGcmCodec({"k1": K1}, current="k1")
    client = await Client.connect(nats_server.url, codec=codec)
    try:
        async with running_worker(client, [confidential, doomed, sealed_tail]):
            handle = await client.start(confidential, {"secret": "INPUT-S3CRET"}, run_id="c-1")
            await wait_for(lambda: _status(client, "c-1", "waiting"), timeout=15, what="wait")
            await client.signal("c-1", "approve", {"note": "SIGNAL-S3CRET"})
            assert await handle.result(timeout=15) == {
                "echo": "STEP-S3CRET INPUT-S3CRET",
                "caught": "ERROR-S3CRET in a message",
                "signal": {"note": "SIGNAL-S3CRET"},
                "result": "RESULT-S3CRET",
            }
            tail = await client.start(sealed_tail, "INPUT-S3CRET", run_id="c-4")
            assert await tail.result(timeout=15) == "LAST-S3CRET INPUT-S3CRET"
            failing = await client.start(doomed, "INPUT-S3CRET", run_id="c-2")
            with pytest.raises(RunFailed, match="ERROR-S3CRET of the run"):
                await failing.result(timeout=15)
        # A run no worker serves keeps its task, with the inline copy of its start, in the
        # task stream: sealed too.
        await client.start(doomed, "INPUT-S3CRET", run_id="c-3", queue="nobody")
        await wait_for(lambda: _indexed(client, 3), timeout=10, what="the runs indexed")
        assert next(r.result for r in await client.list() if r.run_id == "c-1")["echo"]
    finally:
        await client.close()
    stored = b"\n".join(await stored_messages(nats_server.url))
    assert b"$natflow_encrypted" in stored
    assert b"natflow.task.nobody.doomed.c-3 " in stored  # the pending task was read too
    for secret in SECRETS:
        assert secret.encode() not in stored, secret


async def _status(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


async def _indexed(client: Client, count: int) -> bool:
    return len([r for r in await client.list() if r.is_closed]) == count


async def test_rotated_keys_still_replay_old_runs(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    old = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": K1}, current="k1"))
    try:
        async with running_worker(old, [confidential]):
            await old.start(confidential, {"secret": "INPUT-S3CRET"}, run_id="r-1")
            await wait_for(lambda: _status(old, "r-1", "waiting"), timeout=15, what="wait")
    finally:
        await old.close()
    # A new worker (nothing in memory: it replays) with the rotated set, k2 current.
    rotated = AesGcmCodec({"k2": K2, "k1": K1}, current="k2")
    new = await Client.connect(nats_server.url, codec=rotated)
    try:
        async with running_worker(new, [confidential]):
            await new.signal("r-1", "approve", "after rotation")
            result = await new.handle("r-1").result(timeout=15)
        assert result["echo"] == "STEP-S3CRET INPUT-S3CRET"
        assert result["signal"] == "after rotation"
    finally:
        await new.close()
    stored = b"\n".join(await stored_messages(nats_server.url))
    assert b'"$natflow_encrypted":"k1"' in stored
    assert b'"$natflow_encrypted":"k2"' in stored


async def test_a_worker_without_the_key_hands_the_task_back_naming_it(
    nats_server: EmbeddedServer, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    client = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": K1}, current="k1"))
    keyless = await Client.connect(nats_server.url, codec=AesGcmCodec({"k2": K2}, current="k2"))
    try:
        await client.start(confidential, {"secret": "INPUT-S3CRET"}, run_id="k-1")
        with caplog.at_level(logging.ERROR, logger="natflow.worker"):
            async with running_worker(keyless, [confidential]):
                await wait_for(
                    lambda: _logged(caplog, "encrypted with key 'k1'"),
                    timeout=15,
                    what="the keyless worker's error",
                )
        info = await client.describe("k-1")
        assert info.status == "pending"  # nothing recorded, nothing lost
        start = (await keyless.history("k-1"))[0]  # shown sealed to who lacks the key
        assert isinstance(start, RunStarted)
        assert bytes(start.input).startswith(b'{"$natflow_encrypted":"k1"')
        with pytest.raises(MissingKey, match="'k1'"):
            open_sealed(keyless.connection.codec, bytes(start.input))
        async with running_worker(client, [confidential]):
            # The task comes back after the keyless worker's nak delay, or its ack deadline
            # (15 s) if it stopped holding the task.
            await wait_for(lambda: _status(client, "k-1", "waiting"), timeout=40, what="wait")
            await client.signal("k-1", "approve", 1)
            assert (await client.handle("k-1").result(timeout=15))["signal"] == 1
        with pytest.raises(MissingKey, match="the result of run 'k-1' is encrypted with key 'k1'"):
            await keyless.handle("k-1").result(timeout=5)
    finally:
        await keyless.close()
        await client.close()


def _logged_now(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)


async def test_cli_shows_encrypted_values_without_keys_and_opens_them_with_keys(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    client = await Client.connect(nats_server.url, codec=AesGcmCodec({"k2": K2}, current="k2"))
    try:
        async with running_worker(client, [doomed]):
            handle = await client.start(doomed, "INPUT-S3CRET", run_id="cli-1")
            with pytest.raises(RunFailed):
                await handle.result(timeout=15)
    finally:
        await client.close()

    def show(keys: str | None) -> str:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("NATFLOW_CODEC_KEYS", None)
        if keys is not None:
            env["NATFLOW_CODEC_KEYS"] = keys
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "natflow_engine",
                "--url",
                nats_server.url,
                "runs",
                "show",
                "cli-1",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    hidden = await anyio.to_thread.run_sync(lambda: show(None))
    assert "ValueError: encrypted (key k2)" in hidden
    assert "S3CRET" not in hidden
    opened = await anyio.to_thread.run_sync(lambda: show(f"k2:{b64encode(K2).decode()}"))
    assert "ValueError: ERROR-S3CRET of the run: INPUT-S3CRET" in opened


SEALED = Path(__file__).parent / "histories-sealed"


def test_a_recorded_sealed_history_replays_with_its_key() -> None:
    """Recorded with K1 by an earlier version: still opens and replays to its result."""
    path = SEALED / "sealed-confidential-1.jsonl"
    assert b"S3CRET" not in path.read_bytes()
    events = [decode_event(line) for line in path.read_bytes().splitlines() if line.strip()]
    with pytest.raises(MissingKey, match="'k1'"):
        open_events(AesGcmCodec({"k2": K2}, current="k2"), events, path.stem)
    opened = open_events(AesGcmCodec({"k2": K2, "k1": K1}, current="k2"), events, path.stem)
    final = opened[-1]
    assert isinstance(final, RunCompleted)
    replayed = Replayer([confidential]).replay(opened[:-1], path.stem)
    assert replayed.ok, replayed.divergence
    assert replayed.finished and replayed.error is None, replayed.error
    assert replayed.result == msgspec.json.decode(final.result)
    assert replayed.result["signal"] == {"note": "SIGNAL-S3CRET"}


async def _closed(client: Client, run_id: str) -> bool:
    try:
        return (await client.describe(run_id)).is_closed
    except RunNotFound:
        return False


async def test_retry_errors_schedule_inputs_and_event_payloads_are_sealed(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    """What issues 11 and 14 added carries user values too: a failed attempt's error before
    its retry (step_retrying), a schedule's input (KV), an emitted event's payload (and so
    the input of the run it starts). None reaches JetStream in plaintext; the key holder
    reads them, the console shows "encrypted (key k1)" without the key."""
    _tries.clear()
    codec = AesGcmCodec({"k1": K1}, current="k1")
    client = await Client.connect(nats_server.url, codec=codec)
    try:
        async with running_worker(client, [sealed_retry]):
            secret = {"secret": "SCHEDULE-S3CRET"}
            await client.schedules.create("sealed-daily", sealed_retry, secret, every=86400)
            assert (await client.schedules.describe("sealed-daily")).input == secret
            fired = await client.schedules.trigger("sealed-daily")
            assert await fired.result(timeout=15) == "ok"

            async def declared() -> bool:
                return bool(await declarations(client.connection, "sealed.order"))

            await wait_for(declared, timeout=15, what="the event trigger")
            seq = await client.emit("sealed.order", {"secret": "EVENT-S3CRET"}, event_id="e-1")
            run_id = event_run_id("sealed.order", "e-1", seq, "sealed_retry")
            await wait_for(lambda: _closed(client, run_id), timeout=15, what="the event's run")
            assert await client.handle(run_id).result(timeout=5) == "ok"
            history = await client.history(run_id)
            retried = [e for e in history if isinstance(e, StepRetrying)]
            assert retried and "RETRY-S3CRET" in retried[0].error.message, retried
            async with served_console(nats_server.url, codec=codec) as base:
                opened = (await http(f"{base}/runs/{run_id}"))[1]
            assert "EVENT-S3CRET" in opened and "RETRY-S3CRET" in opened
    finally:
        await client.close()
    keyless = await Client.connect(nats_server.url)
    try:
        assert sealed_key((await keyless.schedules.describe("sealed-daily")).input) == "k1"
        history = await keyless.history(run_id)
        retried = [e for e in history if isinstance(e, StepRetrying)]
        assert retried[0].error.message == "encrypted (key k1)"
    finally:
        await keyless.close()
    # A sealed signal to the finished run is dead-lettered with its sealed payload.
    late = seal(codec, msgspec.json.encode({"x": "LATE-S3CRET"}))
    async with await Client.connect(nats_server.url) as plain:
        await send(plain.connection, run_id, "late", late, None)

    async def dead_lettered() -> bool:
        async with await Client.connect(nats_server.url) as reader:
            return any(d.run_id == run_id for d in await dead_letters(reader.connection))

    await wait_for(dead_lettered, timeout=15, what="the late signal dead-lettered")
    async with served_console(nats_server.url) as base:
        status, page, _ = await http(f"{base}/runs/{run_id}")
        dead = (await http(f"{base}/dead-letters"))[1]
    assert status == 200 and "encrypted (key k1)" in page, page[-3000:]
    assert "S3CRET" not in page
    assert "encrypted (key k1)" in dead and "$natflow_encrypted" not in dead, dead[-3000:]
    stored = b"\n".join(await stored_messages(nats_server.url))
    for secret_text in ("SCHEDULE-S3CRET", "EVENT-S3CRET", "RETRY-S3CRET"):
        assert secret_text.encode() not in stored, secret_text


async def test_a_worker_with_a_wrong_key_under_the_right_id_hands_the_task_back(
    nats_server: EmbeddedServer, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped key (k1 given another key's bytes): the run was parked for good, and the
    fixed key did not bring it back; a list through that codec failed for every run."""
    client = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": K1}, current="k1"))
    wrong = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": K2}, current="k1"))
    try:
        await client.start(confidential, {"secret": "INPUT-S3CRET"}, run_id="w-1")
        with caplog.at_level(logging.ERROR, logger="natflow.worker"):
            async with running_worker(wrong, [confidential]):
                await wait_for(
                    lambda: _logged(caplog, "could not be decrypted with key 'k1'"),
                    timeout=15,
                    what="the wrong-key worker's error",
                )
        # Handed back as for a missing key, not counted toward parking the run as a bug.
        assert _logged_now(caplog, "w-1: handing it back: ")
        assert not _logged_now(caplog, "task failed")
        assert (await client.describe("w-1")).status == "pending"  # not blocked, not parked
        assert [r.run_id for r in await wrong.list()] == ["w-1"]  # shown sealed, no error
        async with running_worker(client, [confidential]):
            await wait_for(lambda: _status(client, "w-1", "waiting"), timeout=40, what="wait")
            await client.signal("w-1", "approve", 1)
            assert (await client.handle("w-1").result(timeout=15))["signal"] == 1
    finally:
        await wrong.close()
        await client.close()


def test_codec_keys_from_the_environment_are_checked_and_never_shown() -> None:
    """A malformed entry printed the whole entry (a bare key, a secret); a repeated id let
    the later key take over; an id with a space was made silently."""
    import base64

    key = base64.b64encode(K1).decode()
    other = base64.b64encode(K2).decode()
    for text, said in [
        (key, "entry 1 is not"),
        (f"k1={key}", "entry 1 is not"),
        (f"k1:{key},{other}", "entry 2 is not"),
        (f"k1:{key},k1:{other}", "'k1' is given twice"),
        (f"k1 :{key}", "no spaces"),
    ]:
        with pytest.raises(InvalidInput, match=said) as refused:
            AesGcmCodec.from_env(text)
        assert key not in str(refused.value) and other not in str(refused.value)
    codec = AesGcmCodec.from_env(f"k2:{other},k1:{key}")
    assert codec is not None and codec.encrypt(b"x")[0] == "k2"


def test_an_on_complete_input_sealed_whole_opens_its_outcome_too() -> None:
    """An engine given NATFLOW_CODEC_KEYS sealed the whole RunOutcome it hands on; opened,
    its result stayed sealed inside (the outer envelope was opened and that was all)."""
    import msgspec
    from natflow_engine._sealing import open_event, seal
    from natflow_engine.events import RunStarted, utcnow

    codec = AesGcmCodec({"k1": K1}, current="k1")
    result = msgspec.json.decode(seal(codec, b'{"secret": "hello"}'))
    outcome = msgspec.json.encode(
        {"run_id": "r", "workflow": "w", "status": "completed", "result": result}
    )
    start = RunStarted(
        id="hook:1",
        at=utcnow(),
        workflow="hook",
        queue="default",
        input=msgspec.Raw(seal(codec, outcome)),
        on_complete_of="r",
    )
    opened = open_event(codec, start, "hook")
    assert isinstance(opened, RunStarted)
    assert msgspec.json.decode(opened.input)["result"] == {"secret": "hello"}


async def test_a_user_value_that_begins_like_an_envelope_is_sealed_as_any_other(
    nats_server: EmbeddedServer,
) -> None:
    """Its first key the marker, it was taken for natflow's envelope: stored in plaintext."""
    from natflow_engine._sealing import is_sealed, seal

    codec = AesGcmCodec({"k1": K1}, current="k1")
    lookalike = b'{"$natflow_encrypted":"k1","card":"LOOKALIKE-S3CRET"}'
    assert not is_sealed(lookalike)
    sealed = seal(codec, lookalike)
    assert b"LOOKALIKE" not in sealed and is_sealed(sealed)
