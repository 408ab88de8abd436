"""Redeliveries never move a run away from a live holder; a cluster's leaders can die."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from pathlib import Path

import anyio
import pytest
from natflow import Client
from natflow_engine._connection import NoResponders
from natflow_engine._leases import Lease, Leases
from natflow_engine._registry import ping_subject
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import start_consumer
from natflow_engine._tasks import Task, enqueue
from natflow_engine.events import RunClaimed, StepCompleted

from tests.helpers import count_lines, running_engine, spawn_worker, stop, wait_for
from tests.test_poison import counts as poison_counts
from tests.test_poison import spawn, workers_up
from tests.test_topologies import cluster  # noqa: F401 - the 3-node cluster fixture
from tests.workflows_chaos import COUNTS_ENV as CHAOS_COUNTS_ENV
from tests.workflows_poison import COUNTS_ENV as POISON_COUNTS_ENV
from tests.workflows_proc import COUNTS_ENV, GATE_ENV

TARGET = "tests.workflows_proc:make_worker"
CHAOS_TARGET = "tests.workflows_chaos:make_worker"


async def held_in_step_three(client: Client, run_id: str) -> tuple[Lease, int]:
    """Once the run's gated third step runs: its holder's lease."""

    async def in_step_three() -> bool:
        steps = await client.steps(run_id)
        return [s.status for s in steps] == ["completed", "completed", "running"]

    await wait_for(in_step_three, timeout=30, what="step three running")
    lease = await Leases(client.connection).get(run_id)
    assert lease is not None
    return lease


async def test_a_redelivery_while_the_holder_is_alive_does_not_move_the_run(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    counts, gates = tmp_path / "counts.txt", tmp_path / "gates"
    gates.mkdir()
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    procs = [
        spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / f"w{i}.log") for i in range(2)
    ]
    try:
        await workers_up(client, 2)
        handle = await client.start("crash_counter", 1, run_id="redeliver-1")

        lease = await held_in_step_three(client, "redeliver-1")
        # What a consumer leader change does to in-flight tasks: deliver them again. The
        # run's delivery is its start, from its start consumer (the lease names its ack).
        stream, consumer = lease[0].ack_subject.split(".")[2:4]
        assert (stream, consumer) == ("NATFLOW_HISTORY", start_consumer("default", "crash_counter"))

        async def delivered() -> int:
            info = await client.connection.jsm.consumer_info(stream, consumer)
            return info.delivered.consumer_seq or 0

        for _ in range(6):
            before = await delivered()
            await client.connection.nc.publish(lease[0].ack_subject, b"-NAK")

            async def again(before: int = before) -> bool:
                return await delivered() > before

            await wait_for(again, timeout=10, what="the task delivered again")
        (gates / "redeliver-1").touch()
        assert await handle.result(timeout=30) == {"one": 1, "two": 2, "three": 3}
        history = await client.history("redeliver-1")
        claims = [e for e in history if isinstance(e, RunClaimed)]
        assert len(claims) == 1, claims
        completed = Counter(e.name for e in history if isinstance(e, StepCompleted))
        assert completed == Counter({"one": 1, "two": 1, "three": 1})
        assert count_lines(counts)["redeliver-1:three"] == 1
        assert [p.poll() for p in procs] == [None, None]
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
        assert "leaving it there" in logs
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


async def test_a_first_delivery_while_the_holder_is_alive_does_not_move_the_run(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    """Not only a redelivery: a task delivered for the first time (a wake-up, or a first
    delivery whose claim met the claim of the worker that got the redelivery meanwhile) is
    no permission to take a run from its live holder either."""
    counts, gates = tmp_path / "counts.txt", tmp_path / "gates"
    gates.mkdir()
    env = {COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    logs = [tmp_path / "holder.log", tmp_path / "other.log"]
    # The holder takes one run at a time, so the second task goes to the other worker.
    holder = spawn_worker(
        nats_server.url, "tests.workflows_proc:make_single_worker", env=env, log=logs[0]
    )
    procs = [holder]
    try:
        await workers_up(client, 1)
        handle = await client.start("crash_counter", 1, run_id="first-1")

        lease = await held_in_step_three(client, "first-1")
        # The holder's task settled while it still holds the run, and a new one enqueued:
        # the other worker gets it as a first delivery.
        await client.connection.nc.request(lease[0].ack_subject, b"+ACK", timeout=5)
        procs.append(spawn_worker(nats_server.url, TARGET, env=env, log=logs[1]))
        await workers_up(client, 2)
        assert await enqueue(
            client.connection, "default", Task(run_id="first-1", workflow="crash_counter")
        )

        def decided() -> bool:
            return "leaving it there" in logs[1].read_text() if logs[1].exists() else False

        async def claimed_twice() -> bool:
            history = await client.history("first-1")
            return sum(isinstance(e, RunClaimed) for e in history) > 1

        async def other_decided() -> bool:
            return decided() or await claimed_twice()

        await wait_for(other_decided, timeout=30, what="the other worker's decision")
        (gates / "first-1").touch()
        assert await handle.result(timeout=30) == {"one": 1, "two": 2, "three": 3}
        history = await client.history("first-1")
        claims = [e for e in history if isinstance(e, RunClaimed)]
        assert len(claims) == 1, claims
        assert count_lines(counts)["first-1:three"] == 1
        assert [p.poll() for p in procs] == [None, None]
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


async def test_a_step_that_blocks_the_loop_keeps_its_run_and_is_reported_by_name(
    client: Client, nats_server: EmbeddedServer, engine: object, tmp_path: Path
) -> None:
    procs = spawn(nats_server, tmp_path, 2)
    try:
        await workers_up(client, 2)
        # time.sleep(6) inside an async step, with a 2 s lease: three lease periods blocked.
        handle = await client.start("blocker", 6.0, run_id="block-1")
        others = [await client.start("doubler", i, run_id=f"other-{i}") for i in range(5)]
        assert await handle.result(timeout=60) == "slept"
        for i, other in enumerate(others):
            assert await other.result(timeout=30) == 2 * i
        assert poison_counts(tmp_path / "counts.txt")["block-1:sleeps_blocking"] == 1
        claims = [e for e in await client.history("block-1") if isinstance(e, RunClaimed)]
        assert len(claims) == 1, claims
        assert [p.poll() for p in procs] == [None, None]
        logs = "".join((tmp_path / f"worker-{i}.log").read_text() for i in range(2))
        assert "event loop has been blocked" in logs and "'sleeps_blocking' of run block-1" in logs
        assert "lease taken by another worker" not in logs
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)


CHAOS_RUNS = 60


async def _leader(client: Client, stream: str, consumer: str | None = None) -> str | None:
    jsm = client.connection.jsm
    try:
        info = await (jsm.consumer_info(stream, consumer) if consumer else jsm.stream_info(stream))
    except Exception:  # an election is under way
        return None
    return info.cluster.leader if info.cluster else None


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_killing_stream_and_consumer_leaders_under_load_loses_and_repeats_nothing(
    cluster: list[EmbeddedServer],  # noqa: F811 - the fixture imported above
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("NATFLOW_REPLICAS", "3")
    urls = [s.url for s in cluster]
    by_name = dict(zip(("n1", "n2", "n3"), cluster, strict=True))
    client = await Client.connect(urls, connect_timeout=10)
    counts = tmp_path / "counts.txt"
    env = {CHAOS_COUNTS_ENV: str(counts), "NATFLOW_REPLICAS": "3"}
    procs: list[subprocess.Popen[bytes]] = []
    try:

        async def quorum() -> bool:
            try:
                return await client.connection.jsm.account_info() is not None
            except Exception:  # the meta leader is still being elected
                return False

        await wait_for(quorum, timeout=60, what="the JetStream meta leader")
        async with running_engine(",".join(urls)):
            procs = [
                spawn_worker(",".join(urls), CHAOS_TARGET, env=env, log=tmp_path / f"chaos-{i}.log")
                for i in range(2)
            ]
            await workers_up(client, 2)
            handles = []
            victims = [
                ("NATFLOW_HISTORY", None),
                ("NATFLOW_HISTORY", start_consumer("default", "chaos_steps")),  # new runs
                ("NATFLOW_HISTORY", None),
            ]
            for round_no, (stream, consumer) in enumerate(victims):
                for i in range(CHAOS_RUNS // len(victims)):
                    n = round_no * 100 + i
                    handles.append(await client.start("chaos_steps", n, run_id=f"chaos-{n}"))
                leader = await wait_for(
                    lambda s=stream, c=consumer: _leader(client, s, c),
                    timeout=30,
                    what=f"the leader of {consumer or stream}",
                )
                by_name[leader].kill()  # with steps in flight

                async def moved(
                    s: str = stream, c: str | None = consumer, gone: str = leader
                ) -> bool:
                    return await _leader(client, s, c) not in (None, gone)

                await wait_for(moved, timeout=30, what=f"a new leader of {consumer or stream}")
                by_name[leader].start()
            for handle in handles:
                n = int(handle.run_id.split("-")[1])
                assert await handle.result(timeout=90) == n + 3
        # Every step recorded once, and (no worker died) executed once.
        for handle in handles:
            history = await client.history(handle.run_id)
            done = Counter(e.name for e in history if isinstance(e, StepCompleted))
            assert done == Counter({"a": 1, "b": 1, "c": 1}), (handle.run_id, history)
        executions = Counter(line.rsplit(":", 1)[0] for line in counts.read_text().splitlines())
        repeated = {key: n for key, n in executions.items() if n > 1}
        assert not repeated, repeated
        assert len(executions) == 3 * len(handles)
        assert [p.poll() for p in procs] == [None, None]
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
        await client.close()


async def test_without_a_second_connection_heartbeats_and_pings_run_on_the_loop(
    client: Client, engine: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from natflow._pulse import Pulse

    from tests.helpers import running_worker
    from tests.workflows_poison import doubler

    monkeypatch.setattr(Pulse, "start", lambda self, timeout=10.0: False)
    monkeypatch.setenv(POISON_COUNTS_ENV, "/dev/null")
    async with running_worker(client, [doubler], lease_ttl=1.0) as worker:
        assert not worker._pulse_thread
        handle = await client.start("doubler", 4, run_id="inloop-1")
        assert await handle.result(timeout=20) == 8
        reply = await client.connection.request(ping_subject(worker.identity), b"inloop-1")
        assert reply.data == b"free"


async def test_a_worker_whose_heartbeat_connection_is_down_still_answers_pings(
    client: Client, engine: object
) -> None:
    """The reaper takes "no responders" for a worker that is gone. After a cluster node died,
    a worker's heartbeat connection took seconds to come back while its own took
    milliseconds: the reaper handed its runs to another worker, which ran their steps again
    (the chaos test above, under the suite's load). Both connections answer pings now."""
    from tests.helpers import running_worker
    from tests.workflows_poison import doubler

    async with running_worker(client, [doubler]) as worker:

        async def answer() -> bytes | None:
            try:
                reply = await client.connection.request(ping_subject(worker.identity), b"")
            except NoResponders:
                return None
            return reply.data

        assert await wait_for(answer, what="the worker's first answer") == worker.identity.encode()

        async def pulse_started() -> bool:  # its thread answers before start() has returned
            return worker._pulse_thread

        await wait_for(pulse_started, what="the heartbeat thread started")
        assert worker._pulse is not None
        await anyio.to_thread.run_sync(worker._pulse.stop)  # its connection is gone
        assert await wait_for(answer, timeout=5, what="an answer") == worker.identity.encode()
        reply = await client.connection.request(ping_subject(worker.identity), b"no-such-run")
        assert reply.data == b"free"
