"""Signals (issue 4): from plain nats-py or the client, durable from the acknowledgement,
moved into history once and in order, deduplicated, racing their timeouts, and bad ones
dead-lettered without hurting the run.

Against a real nats-server; the engine and worker run in-process unless the test kills one,
then they are real processes (``natflow engine``, ``natflow worker``).
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from natflow import Client, NatflowError, RunCancelled, RunNotFound, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import DeadLetter, dead_letters
from natflow_engine._streams import SIGNAL_STREAM
from natflow_engine.events import (
    RunCompleted,
    SignalReceived,
    SignalRejected,
    SignalWaited,
    StepCompleted,
    TimerFired,
)

from tests.helpers import (
    ROOT,
    replay_recorded,
    running_engine,
    running_worker,
    spawn_worker,
    wait_for,
)
from tests.workflows_waits import (
    TARGET,
    WORKFLOWS,
    engine_process,
    held_by,
    of,
    race,
    registered,
    step_then_wait,
    tag,
    timed_wait,
    wait_n,
    wait_once,
)


@pytest.fixture
async def plain(nats_server: EmbeddedServer) -> AsyncIterator[Any]:
    """A plain nats-py JetStream context: no natflow code on the sending side."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def status_is(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


async def waiting_alone(client: Client, worker: Any, run_id: str) -> None:
    """Wait until the run waits for a signal and the worker has let it go (so the test's
    signals wake an idle run, not one the worker is just letting go: see the last test)."""

    async def let_go() -> bool:
        return await status_is(client, run_id, "waiting") and run_id not in worker.held_runs

    await wait_for(let_go, what=f"{run_id} to wait, held by no worker")


async def dead_letter(client: Client, ack: Any) -> DeadLetter:
    """Wait for the engine's dead letter for the signal stored with this acknowledgement."""

    async def found() -> DeadLetter | None:
        for letter in await dead_letters(client.connection, limit=1000):
            if letter.signal_seq == ack.seq:
                return letter
        return None

    letter = await wait_for(found, what=f"a dead letter for signal #{ack.seq}")
    assert letter is not None
    return letter


async def stored(js: Any, subject: str) -> int:
    """How many messages NATFLOW_SIGNALS holds on ``subject``."""
    info = await js.stream_info(SIGNAL_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


# -- delivery ------------------------------------------------------------------------------


async def test_plain_nats_signal_sent_before_the_wait_is_delivered_at_the_wait(
    client: Client, engine: Engine, plain: Any
) -> None:
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(step_then_wait, 1.0, run_id="early-1")
        await wait_for(lambda: status_is(client, "early-1", "running"), what="the step")
        ack = await plain.publish("natflow.signal.early-1.x", b'{"from": "nats-py"}')
        assert ack.stream == SIGNAL_STREAM and ack.seq >= 1
        sent = datetime.now(UTC)
        assert not of(await client.history("early-1"), SignalWaited)  # not at its wait yet
        assert await handle.result(timeout=10) == {"from": "nats-py"}
    events = await client.history("early-1")
    step = of(events, StepCompleted)[0]
    received = of(events, SignalReceived)
    assert len(received) == 1 and received[0].signal_seq == ack.seq
    assert step.at > sent  # the step was still running when the signal was sent


async def test_signal_sent_while_no_worker_and_no_engine_runs_is_delivered_when_they_start(
    client: Client,
    nats_server: EmbeddedServer,
    tmp_path: Path,
    plain: Any,
    processes: list[subprocess.Popen[bytes]],
) -> None:
    url = nats_server.url
    engine = await engine_process(url, tmp_path / "engine.log", processes)
    worker = spawn_worker(url, TARGET, log=tmp_path / "worker.log")
    processes.append(worker)
    await registered(client, 1)
    handle = await client.start(wait_once, None, run_id="offline-1")
    await wait_for(lambda: status_is(client, "offline-1", "waiting"), what="the wait")
    await wait_for(lambda: _none(held_by(client, worker.pid)), what="the worker to let go")
    for proc in (engine, worker):
        proc.kill()
        proc.wait()
    ack = await plain.publish(
        "natflow.signal.offline-1.x", b'"while nobody ran"', headers={"Nats-Msg-Id": "off-1"}
    )
    assert ack.stream == SIGNAL_STREAM and not ack.duplicate
    await anyio.sleep(0.3)  # nothing runs that could deliver it
    assert not of(await client.history("offline-1"), SignalReceived)
    assert (await client.describe("offline-1")).status == "waiting"
    await engine_process(url, tmp_path / "engine.log", processes)
    processes.append(spawn_worker(url, TARGET, log=tmp_path / "worker.log"))
    assert await handle.result(timeout=30) == "while nobody ran"
    received = of(await client.history("offline-1"), SignalReceived)
    assert [(r.signal_seq, r.signal_id) for r in received] == [(ack.seq, "off-1")]


async def _none(runs: Any) -> bool:
    return not await runs


async def test_same_signal_id_twice_is_delivered_once(client: Client, engine: Engine) -> None:
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(wait_n, 1, run_id="dedupe-1")
        await waiting_alone(client, worker, "dedupe-1")
        await client.signal("dedupe-1", "x", "first", signal_id="approval-7")
        await client.signal("dedupe-1", "x", "second", signal_id="approval-7")
        assert await handle.result(timeout=10) == ["first", "no more"]
    received = of(await client.history("dedupe-1"), SignalReceived)
    assert [(r.signal_id, bytes(r.payload)) for r in received] == [
        ("dedupe-1:x:approval-7", b'"first"')
    ]


async def test_one_signal_id_sent_to_two_runs_reaches_both(client: Client, engine: Engine) -> None:
    """Issue 9: the stream deduplicates Nats-Msg-Id across every subject, so an unscoped id
    made run B's signal a "duplicate" of run A's and B waited forever."""
    async with running_worker(client, WORKFLOWS) as worker:
        a = await client.start(wait_n, 1, run_id="scoped-a")
        b = await client.start(wait_n, 1, run_id="scoped-b")
        await waiting_alone(client, worker, "scoped-a")
        await waiting_alone(client, worker, "scoped-b")
        await client.signal("scoped-a", "x", "to a", signal_id="approve")
        await client.signal("scoped-b", "x", "to b", signal_id="approve")
        assert await a.result(timeout=10) == ["to a", "no more"]
        assert await b.result(timeout=10) == ["to b", "no more"]


async def test_a_signal_id_taken_by_another_runs_signal_is_an_error(
    client: Client, engine: Engine, plain: Any
) -> None:
    """A raw publisher that used the scoped form of run A's id on run B's subject: sending
    that id to A is refused, never reported as delivered."""
    async with running_worker(client, WORKFLOWS) as worker:
        await client.start(wait_n, 1, run_id="taken-a")
        b = await client.start(wait_n, 1, run_id="taken-b")
        await waiting_alone(client, worker, "taken-a")
        await plain.publish(
            "natflow.signal.taken-b.x", b'"raw"', headers={"Nats-Msg-Id": "taken-a:x:approve"}
        )
        with pytest.raises(NatflowError, match=r"natflow\.signal\.taken-b\.x"):
            await client.signal("taken-a", "x", "mine", signal_id="approve")
        assert await b.result(timeout=10) == ["raw", "no more"]
        await client.terminate("taken-a", "done")


async def test_same_nats_msg_id_twice_via_plain_nats_is_stored_and_delivered_once(
    client: Client, engine: Engine, plain: Any
) -> None:
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(wait_n, 1, run_id="msgid-1")
        await waiting_alone(client, worker, "msgid-1")
        subject = "natflow.signal.msgid-1.x"
        first = await plain.publish(subject, b"1", headers={"Nats-Msg-Id": "m-1"})
        again = await plain.publish(subject, b"2", headers={"Nats-Msg-Id": "m-1"})
        assert not first.duplicate and again.duplicate and again.seq == first.seq
        assert await stored(plain, subject) == 1
        assert await handle.result(timeout=10) == [1, "no more"]
    received = of(await client.history("msgid-1"), SignalReceived)
    assert [(r.signal_seq, r.signal_id) for r in received] == [(first.seq, "m-1")]


async def test_signal_id_repeated_after_the_stream_dedupe_window_is_delivered_once(
    client: Client, engine: Engine, plain: Any
) -> None:
    """The stream forgets a Nats-Msg-Id after its window (2 min); history remembers it. The
    window is shortened here so the test need not wait two minutes."""
    info = await plain.stream_info(SIGNAL_STREAM)
    info.config.duplicate_window = 0.5
    await plain.update_stream(info.config)
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(wait_n, 1, run_id="window-1")
        await waiting_alone(client, worker, "window-1")
        await client.signal("window-1", "x", "first", signal_id="late-dup")
        await wait_for(lambda: _received(client, "window-1", 1), what="the first signal in history")
        await anyio.sleep(0.8)  # the scenario: past the (shortened) window
        await client.signal("window-1", "x", "again", signal_id="late-dup")
        assert await stored(plain, "natflow.signal.window-1.x") == 2  # the stream kept both
        assert await handle.result(timeout=10) == ["first", "no more"]
    received = of(await client.history("window-1"), SignalReceived)
    assert [bytes(r.payload) for r in received] == [b'"first"']


async def _received(client: Client, run_id: str, count: int) -> bool:
    return len(of(await client.history(run_id), SignalReceived)) >= count


async def test_three_signals_of_one_name_feed_three_waits_in_order(
    client: Client, engine: Engine, plain: Any
) -> None:
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(wait_n, 3, run_id="three-1")
        await waiting_alone(client, worker, "three-1")
        # Sent at once, all before the first wait is woken.
        await client.signal("three-1", "x", "a")
        await plain.publish("natflow.signal.three-1.x", b'"b"')
        await client.signal("three-1", "x", "c")
        # (A generous timeout: a wake-up lost to the bug the test below exposes delays the
        # final timeout by the 15 s ack deadline, which is not what this test is about.)
        assert await handle.result(timeout=30) == ["a", "b", "c", "no more"]
    received = of(await client.history("three-1"), SignalReceived)
    assert [bytes(r.payload) for r in received] == [b'"a"', b'"b"', b'"c"']
    seqs = [r.signal_seq for r in received]
    assert seqs == sorted(seqs)


async def test_wait_with_a_one_second_timeout_raises_signal_timeout_after_one_second(
    client: Client, engine: Engine
) -> None:
    async with running_worker(client, WORKFLOWS):
        began = time.time()
        result = await (await client.start(timed_wait, 1.0, run_id="timeout-1")).result(timeout=10)
        elapsed = time.time() - began
    assert result["timeout"] is True and "'never'" in result["error"]
    events = await client.history("timeout-1")
    waited = of(events, SignalWaited)[0]
    fired = of(events, TimerFired)
    assert waited.timeout_at is not None and len(fired) == 1
    assert fired[0].seq == waited.seq and fired[0].at >= waited.timeout_at
    print(
        f"\nSignalTimeout after {result['waited']:.3f} s (workflow clock), "
        f"{(fired[0].at - waited.timeout_at).total_seconds() * 1000:.1f} ms past timeout_at, "
        f"run took {elapsed:.3f} s"
    )
    assert result["waited"] >= 1.0
    assert elapsed >= 1.0


async def test_a_signal_racing_its_timeout_is_decided_once_and_replay_agrees(
    client: Client, engine: Engine
) -> None:
    # Timeouts of 1 s (the worker holds the run and fires it) and 2 s (the run is let go and
    # the engine wakes it), each with the signal sent a little before to a little after.
    offsets = [-0.1, -0.03, -0.01, 0.0, 0.01, 0.03, 0.1]
    cases = [(t, d) for t in (1.0, 2.0) for d in offsets]
    async with running_worker(client, WORKFLOWS):

        async def one(i: int, timeout: float, offset: float) -> None:
            run_id = f"race-{i}"
            await client.start(race, timeout, run_id=run_id)

            async def waited() -> SignalWaited | None:
                found = of(await client.history(run_id), SignalWaited)
                return found[0] if found else None

            wait = await wait_for(waited, what=f"{run_id} to wait")
            assert wait is not None and wait.timeout_at is not None
            send_at = wait.timeout_at.timestamp() + offset
            await anyio.sleep(max(0.0, send_at - time.time()))  # the scenario: race the timeout
            await client.signal(run_id, "x", f"sent {offset:+.2f}")

        async with anyio.create_task_group() as tg:
            for i, (timeout, offset) in enumerate(cases):
                tg.start_soon(one, i, timeout, offset)
        results = [await client.handle(f"race-{i}").result(timeout=20) for i in range(len(cases))]

    outcomes = []
    for i, result in enumerate(results):
        run_id = f"race-{i}"
        events = await client.history(run_id)
        first_wait = of(events, SignalWaited)[0]
        received = of(events, SignalReceived)
        timed_out = [e for e in of(events, TimerFired) if e.seq == first_wait.seq]
        assert len(received) == 1, [tag(e) for e in events]  # consumed exactly once
        if "won" in result:  # the signal beat the timeout: no timer fired for that wait
            assert not timed_out, [tag(e) for e in events]
            assert result["won"] == f"sent {cases[i][1]:+.2f}"
        else:  # the timeout came first; the signal went to the second wait
            assert len(timed_out) == 1 and events.index(timed_out[0]) < events.index(received[0])
            assert result["late"] == f"sent {cases[i][1]:+.2f}"
        outcomes.append("won" if "won" in result else "timeout")
        assert await replayed(client, run_id) == result
    print(
        f"\nrace outcomes (timeout, offset -> outcome): {list(zip(cases, outcomes, strict=True))}"
    )


async def replayed(client: Client, run_id: str) -> Any:
    """The result a fresh replay of the recorded history (without its end) computes."""
    assert isinstance((await client.history(run_id))[-1], RunCompleted)
    replay = await replay_recorded(client, race, run_id)
    assert replay.ok and replay.finished, replay
    return replay.result


# -- bad signals ---------------------------------------------------------------------------


async def test_bad_signals_are_dead_lettered_and_the_run_completes_normally(
    client: Client, engine: Engine, plain: Any, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, WORKFLOWS) as worker:
        handle = await client.start(wait_once, None, run_id="target-1")
        await waiting_alone(client, worker, "target-1")
        bad = {
            "natflow.signal.target-1.a.b": "subject must be natflow.signal.<run_id>.<signal_name>",
            "natflow.signal.target-1.bad!name": "invalid signal name 'bad!name'",
            "natflow.signal.bad!run.x": "invalid run id 'bad!run'",
            "natflow.signal.nobody-1.x": "no run has this id",
        }
        acks = {subject: await plain.publish(subject, b'"bad"') for subject in bad}
        not_json = await plain.publish("natflow.signal.target-1.x", b"{not json")
        # msgspec raises UnicodeDecodeError, not DecodeError, for this: it jammed the
        # engine's intake (the whole batch NAKed, a good signal after it never delivered)
        not_utf8 = await plain.publish("natflow.signal.target-1.x", b'"\xff"')
        # Nested deeper than msgspec goes: RecursionError jammed the intake the same way
        too_deep = await plain.publish("natflow.signal.target-1.x", b"[" * 200_000)
        for subject, reason in bad.items():
            letter = await dead_letter(client, acks[subject])
            assert letter.subject == subject and reason in letter.reason, letter
        letter = await dead_letter(client, not_json)
        assert letter.reason.startswith("body is not JSON") and letter.payload == "{not json"
        assert letter.signal_seq == not_json.seq
        letter = await dead_letter(client, not_utf8)
        assert letter.reason.startswith("body is not JSON") and "utf-8" in letter.reason
        letter = await dead_letter(client, too_deep)
        assert letter.reason.startswith("body is not JSON") and "recursion" in letter.reason
        with pytest.raises(RunNotFound):
            await client.signal("nobody-1", "x", "hello")

        # The run is untouched: still waiting, nothing delivered.
        assert (await client.describe("target-1")).status == "waiting"
        assert not of(await client.history("target-1"), SignalReceived)

        # JSON that looks like natflow's stored or sealed values, is not, and can never be
        # opened: rejected in history (each blocked the run, retried until parked)
        forged = {
            b'{"$natflow_ref": 5}': "malformed value reference",
            b'{"$natflow_ref": "deadbeef", "size": 10}': "does not hold",
            b'{"$natflow_encrypted": 1}': "malformed sealed value",
        }
        forged_acks = [(await plain.publish("natflow.signal.target-1.x", body), reason)
                       for body, reason in forged.items()]  # fmt: skip
        await client.signal("target-1", "x", "good")
        assert await handle.result(timeout=10) == "good"
    events = await client.history("target-1")
    received = of(events, SignalReceived)
    assert [(r.name, bytes(r.payload)) for r in received] == [("x", b'"good"')]
    rejected = {r.signal_seq: r for r in of(events, SignalRejected)}
    assert not_json.seq in rejected and rejected[not_json.seq].reason.startswith("body is not JSON")
    for ack, reason in forged_acks:
        assert reason in rejected[ack.seq].reason, rejected[ack.seq]
    print(f"\nrejected in the run's history: {[(r.name, r.reason) for r in rejected.values()]}")

    # A signal to the finished run: a dead letter, and the client refuses it.
    length = len(events)
    late = await plain.publish("natflow.signal.target-1.x", b'"too late"')
    letter = await dead_letter(client, late)
    assert letter.reason == "the run already ended (completed)", letter
    with pytest.raises(NatflowError) as refused:
        await client.signal("target-1", "x", "too late")
    assert not isinstance(refused.value, RunNotFound)
    assert len(await client.history("target-1")) == length

    # natflow lists them.
    done = await anyio.run_process(
        [sys.executable, "-m", "natflow_engine", "--url", nats_server.url, "signals", "dead"],
        cwd=ROOT,
        check=False,
    )
    listed = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    for subject in [*bad, "natflow.signal.target-1.x"]:
        assert subject in listed, listed
    assert "no run has this id" in listed and "body is not JSON" in listed


async def test_a_signal_dead_lettered_for_an_unknown_run_never_reaches_a_later_run_of_that_id(
    client: Client, engine: Engine, plain: Any
) -> None:
    """A dead letter ("no run has this id") is the signal's outcome: it must not also be
    delivered to a run created later under that id (README: it "never touches a run")."""
    ack = await plain.publish("natflow.signal.ghost-1.x", b'"boo"')
    assert (await dead_letter(client, ack)).reason == "no run has this id"
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(wait_once, 1.0, run_id="ghost-1")
        assert await handle.result(timeout=10) == "timeout"
    assert not of(await client.history("ghost-1"), SignalReceived)


# -- no lost wake-ups ----------------------------------------------------------------------


async def test_no_wake_up_is_lost_when_a_signal_arrives_while_the_run_is_processed(
    client: Client, engine: Engine
) -> None:
    """A step of 0.5 s, then a wait; the signal is sent at a different moment of the step (or
    just after it, while the worker lets the run go) each time."""
    rounds = 40
    offsets = [0.035 * i for i in range(20)] + [0.45 + 0.0075 * i for i in range(20)]
    async with running_worker(client, WORKFLOWS):

        async def one(i: int) -> None:
            run_id = f"busy-{i}"
            await client.start(step_then_wait, 0.5, run_id=run_id)
            await wait_for(lambda: status_is(client, run_id, "running"), what="the step")
            await anyio.sleep(offsets[i])  # the scenario: 0 to 0.67 s into a 0.5 s step
            await client.signal(run_id, "x", i)

        async with anyio.create_task_group() as tg:
            for i in range(rounds):
                tg.start_soon(one, i)
        for i in range(rounds):
            assert await client.handle(f"busy-{i}").result(timeout=15) == i
    for i in range(rounds):
        received = of(await client.history(f"busy-{i}"), SignalReceived)
        assert len(received) == 1


async def test_no_wake_up_is_lost_when_a_signal_arrives_as_the_worker_lets_the_run_go(
    client: Client, engine: Engine
) -> None:
    """Three signals at once to a run that waits for three, then waits with a 1.5 s timeout.
    The worker moves the signals into history itself and lets the run go between waits; the
    engine's intake, a little behind it, wakes the run for a signal just as the worker lets
    it go. That late task must not hold up the run's next wake-up (a signal, or the
    timeout). One run at a time (the race needs a quiet worker), with a little jitter; the
    first run that stalls ends the test."""
    rounds = 200
    stalled = None
    async with running_worker(client, WORKFLOWS):
        for i in range(rounds):
            run_id = f"letgo-{i}"
            await client.start(wait_n, 3, run_id=run_id)
            for value in ("a", "b", "c"):
                await client.signal(run_id, "x", value)
                await anyio.sleep(0.001 * (i % 8))  # the scenario: vary the race a little
            try:
                await wait_for(
                    partial(_timed_wait, client, run_id), timeout=3, what="the timed wait"
                )
            except AssertionError:
                stalled = run_id
                break
        else:
            for i in range(rounds):
                result = await client.handle(f"letgo-{i}").result(timeout=40)
                assert result == ["a", "b", "c", "no more"]
    if stalled is not None:
        events = await client.history(stalled)
        raise AssertionError(
            f"{stalled} (round {i + 1} of {rounds}) did not get its three signals within 3 s: "
            f"{[tag(e) for e in events]}"
        )
    late = []
    for i in range(rounds):
        events = await client.history(f"letgo-{i}")
        wait = of(events, SignalWaited)[-1]
        fired = [e for e in of(events, TimerFired) if e.seq == wait.seq]
        assert wait.timeout_at is not None and len(fired) == 1
        late.append((fired[0].at - wait.timeout_at).total_seconds())
    print(f"\ntimeouts after the signals: at most {max(late):.3f} s late")
    assert max(late) < 1.0, f"{sum(x >= 1.0 for x in late)} of {rounds} timeouts were late"


async def _timed_wait(client: Client, run_id: str) -> bool:
    return any(w.timeout_at for w in of(await client.history(run_id), SignalWaited))


async def test_signals_received_counts_what_a_workflow_receives_as_delivered_does(
    client: Client, engine: Engine
) -> None:
    """natflow_signals_received_total counted pause, resume and cancel too, which
    natflow_signals_delivered_total never counts: the dashboards showed signals lost."""
    from prometheus_client import REGISTRY

    def counted(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"workflow": "wait_once"}) or 0.0

    before = counted("natflow_signals_received_total")
    async with running_worker(client, WORKFLOWS):
        handle = await client.start(wait_once, None, run_id="counted-1")
        await client.pause("counted-1")
        await client.resume("counted-1")
        await client.signal("counted-1", "x", "hello")
        assert await handle.result(timeout=10) == "hello"
        other = await client.start(wait_once, None, run_id="counted-2")
        await client.cancel(other.run_id)
        with pytest.raises(RunCancelled):
            await other.result(timeout=10)
    assert counted("natflow_signals_received_total") - before == 1


async def test_a_signal_or_cancel_looks_at_the_runs_last_event_only(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a run ended is its last event's to say: folding the whole history for each
    signal made n signals to a long run cost n reads of all of it (a burst to a run of a few
    thousand events cut the client's connection as a slow consumer)."""
    from tests.helpers import read_requests

    await client.start("nobody-serves-this", 1, run_id="long-lived")
    for n in range(3):
        await client.signal("long-lived", "poke", n)
    sent = read_requests(monkeypatch)  # batch reads of a history, from here on
    await client.signal("long-lived", "poke", 3)
    await client.pause("long-lived")
    assert sent == []
    with pytest.raises(RunNotFound):
        await client.signal("no-such-run", "poke", 1)

    async with running_worker(client, [quick]):  # ended: its last event says so, and how
        await (await client.start(quick, 2, run_id="ended")).result(timeout=10)
    with pytest.raises(NatflowError, match="already ended \\(completed\\)"):
        await client.signal("ended", "poke", 4)
    await client.cancel("ended")  # nothing to do, nothing sent


@workflow(name="quick")
async def quick(ctx: WorkflowContext, x: int) -> int:
    return x


async def test_a_forged_sealed_signal_holds_its_run_a_while_not_for_ever(
    client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that looks sealed with a key no worker holds (anyone may send one) was handed
    back for good: the run never took another signal. Past a while (an hour; nothing here)
    it is rejected and the run goes on."""
    from natflow import _signal_intake
    from natflow_engine.events import SignalRejected

    monkeypatch.setattr(_signal_intake, "KEY_PATIENCE", timedelta(0))
    async with running_worker(client, [wait_once]):
        handle = await client.start(wait_once, None, run_id="forged")
        await wait_for(lambda: _waiting_now(client, "forged"), what="the run waiting")
        forged = b'{"$natflow_encrypted":"x","alg":"AES-GCM","data":"AAAA"}'
        await client.connection.js.publish("natflow.signal.forged.x", forged)
        await client.signal("forged", "x", "real")
        assert await handle.result(timeout=20) == "real"
    rejected = [e for e in await client.history("forged") if isinstance(e, SignalRejected)]
    assert rejected and "no worker that could open it" in rejected[0].reason


async def _waiting_now(client: Client, run_id: str) -> bool:
    return (await client.describe(run_id)).status == "waiting"


async def test_a_signal_sealed_with_a_missing_key_adds_no_claim_per_hand_back(
    client: Client,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The run came back every 2 s, and each time the worker claimed it before meeting the
    same signal: one run_claimed more per hand-back, for the hour it waits for the key."""
    from natflow import _task_processor, _worker
    from natflow_engine.events import RunClaimed

    monkeypatch.setattr(_task_processor, "MISSING_KEY_DELAY", 0.05)
    monkeypatch.setattr(_worker, "MISSING_KEY_DELAY", 0.05)
    async with running_worker(client, [wait_once]):
        await client.start(wait_once, None, run_id="keyless")
        await wait_for(lambda: _waiting_now(client, "keyless"), what="the run waiting")
        before = await client.history("keyless")
        forged = b'{"$natflow_encrypted":"x","alg":"AES-GCM","data":"AAAA"}'
        with caplog.at_level(logging.DEBUG, logger="natflow.worker"):
            await client.connection.js.publish("natflow.signal.keyless.x", forged)

            async def handed_back(times: int) -> bool:
                said = [r for r in caplog.records if "handed back" in r.getMessage()]
                return len(said) >= times

            await wait_for(lambda: handed_back(10), what="ten hand-backs")
    claims = [e for e in await client.history("keyless") if isinstance(e, RunClaimed)]
    assert len(claims) <= sum(isinstance(e, RunClaimed) for e in before) + 1, len(claims)


@workflow(name="naps_then_waits")
async def naps_then_waits(ctx: WorkflowContext) -> object:
    await ctx.sleep("short", 0.5)  # held in the worker's memory: it takes the signal after
    return await ctx.wait_for_signal("go")


async def test_a_signal_its_run_took_before_ending_is_not_dead_lettered_when_read_late(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """A worker takes in every stored signal as it wakes, and may end the run before the
    engine's intake reads them: the intake then dead-lettered them as "the run already
    ended", though the run had them (118 in a 20-minute soak, mostly child outcomes)."""
    from natflow_engine._signals import INTAKE
    from natflow_engine._streams import SIGNAL_STREAM

    async with running_worker(client, [naps_then_waits]):
        handle = await client.start(naps_then_waits, run_id="late-intake")
        await wait_for(lambda: _has_kind(client, "late-intake", "TimerScheduled"), what="nap")
        sent = await client.connection.js.publish("natflow.signal.late-intake.go", b'"taken"')
        assert await handle.result(timeout=10) == "taken"  # no engine ran meanwhile
    async with running_engine(nats_server.url):

        async def read() -> bool:
            info = await client.connection.jsm.consumer_info(SIGNAL_STREAM, INTAKE)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(read, what="the intake reading the signal")
    letters = await dead_letters(client.connection, limit=1000)
    assert [d for d in letters if d.signal_seq == sent.seq] == []


async def _has_kind(client: Client, run_id: str, kind: str) -> bool:
    return kind in [type(e).__name__ for e in await client.history(run_id)]
