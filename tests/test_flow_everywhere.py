"""Flow control on every start path (README "Flow control"): run rate limits, singleton and
debounce hold for starts by name, children, schedules, event triggers and starts through the
engine, from the declarations workers publish. Against a real nats-server.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import msgspec
import pytest
from natflow import (
    Client,
    Debounce,
    InvalidInput,
    RateLimit,
    RunFailed,
    RunInfo,
    RunNotFound,
    WorkflowContext,
    workflow,
)
from natflow_engine import RATES_BUCKET, NoResponders
from natflow_engine._kv import kv_entries, kv_get
from natflow_engine._server import EmbeddedServer
from natflow_engine._triggers import EVENT_ID_HEADER, event_run_id, recent_events
from natflow_engine.events import RunStarted

from tests import workflows_flow as flows
from tests.helpers import running_worker, wait_for

LIVE = {"now": 0, "peak": 0, "runs": 0}


async def hold(seconds: float) -> None:
    LIVE["now"] += 1
    LIVE["runs"] += 1
    LIVE["peak"] = max(LIVE["peak"], LIVE["now"])
    try:
        await anyio.sleep(seconds)
    finally:
        LIVE["now"] -= 1


@workflow(name="fe_guarded", singleton=True)
async def guarded(ctx: WorkflowContext) -> None:
    await ctx.step("hold", hold, 2.5)  # longer than the schedule's interval


@workflow(name="fe_reindex", on_event="fe.saved", debounce=Debounce(1.5, key="doc"))
async def reindex(ctx: WorkflowContext, input: dict[str, Any]) -> dict[str, Any]:
    return input


@workflow(name="fe_imports", rate_limit=RateLimit("fe-imports", limit=1, period=4.0))
async def imports(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return input["i"]


@workflow(name="fe_parent")
async def parent(ctx: WorkflowContext, customer: str) -> str:
    try:
        await ctx.child(flows.one_per_customer, {"customer": customer})
    except RunFailed as exc:
        return str(exc)
    return "the child ran"


@workflow(name="fe_import_parent")
async def import_parent(ctx: WorkflowContext) -> list[Any]:
    return list(await ctx.parallel(ctx.child(imports, {"i": 1}), ctx.child(imports, {"i": 2})))


@workflow(name="fe_single_ev", on_event="fe.single", singleton=True)
async def single_on_event(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return input["n"]


@workflow(
    name="fe_rated_ev",
    on_event="fe.rated",
    rate_limit=RateLimit("fe-rated-ev", limit=2, period=120.0, burst=2),
)
async def rated_on_event(ctx: WorkflowContext, input: dict[str, Any]) -> Any:
    return input["n"]


@workflow(name="fe_digest", debounce=1.5)
async def digest(ctx: WorkflowContext, outcome: dict[str, Any]) -> Any:
    return outcome["result"]


@workflow(name="fe_quick")
async def quick(ctx: WorkflowContext, x: int) -> int:
    return x


@workflow(name="fe_plain")
async def plain(ctx: WorkflowContext, x: int) -> int:
    return x


async def declared_by_worker(client: Client, name: str) -> None:
    """Wait until a worker has published ``name``'s declaration."""

    async def found() -> bool:
        try:
            return await kv_get(client.connection, RATES_BUCKET, f"decl.{name}") is not None
        except NoResponders:  # the bucket is not made yet
            return False

    await wait_for(found, what=f"the declaration of {name}")


async def test_a_singleton_fired_by_a_schedule_every_second_never_has_two_open_runs(
    client: Client, engine: object
) -> None:
    LIVE.update(now=0, peak=0, runs=0)
    async with running_worker(client, [guarded]):
        await declared_by_worker(client, "fe_guarded")
        # allow_all: the schedule itself would start a run every second, whatever is open.
        await client.schedules.create("fe-guard", guarded, every=1, overlap="allow_all")

        async def fired_enough() -> bool:
            info = await client.schedules.describe("fe-guard")
            return LIVE["runs"] >= 2 and len(info.recent_runs) >= 4

        await wait_for(fired_enough, timeout=30, what="four fires and two runs")
        await client.schedules.delete("fe-guard")
    assert LIVE["peak"] == 1, LIVE  # the fires during an open run joined it


async def test_five_events_within_a_debounce_window_make_one_run_with_the_last_input(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [reindex]):
        await declared_by_worker(client, "fe_reindex")
        for v in range(5):
            await client.emit("fe.saved", {"doc": "d1", "v": v})

        async def runs() -> list[Any]:
            return await client.list(workflow="fe_reindex")

        (run,) = await wait_for(runs, what="the debounced run")
        assert await client.handle(run.run_id).result(timeout=15) == {"doc": "d1", "v": 4}

        async def settled() -> list[Any] | None:
            listed = await client.list(workflow="fe_reindex")
            return listed if listed and all(r.status == "completed" for r in listed) else None

        assert [r.run_id for r in await wait_for(settled, what="the index")] == [run.run_id]


async def test_a_start_by_name_of_a_rate_limited_workflow_is_delayed_like_one_with_the_definition(
    client: Client, nats_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with await Client.connect(nats_server.url) as early:
        with caplog.at_level(logging.DEBUG, logger="natflow.flow"):
            first = await early.start("fe_imports", {"i": 0})  # no worker has declared it
        assert "no worker has declared" in caplog.text
        assert (await early.history(first.run_id))[0].not_before is None  # type: ignore[attr-defined]
    async with running_worker(client, [imports]):
        await declared_by_worker(client, "fe_imports")
        async with await Client.connect(nats_server.url) as by_name:
            named = [await by_name.start("fe_imports", {"i": i}) for i in (1, 2)]
        with_definition = await client.start(imports, {"i": 3})
        starts = [(await client.history(h.run_id))[0] for h in [*named, with_definition]]
        assert all(isinstance(s, RunStarted) for s in starts)
        # One slot every 4 s, shared by the starts by name and the one with the definition:
        # the first goes now, the others 4 s apart, each "rate limited".
        assert starts[0].not_before is None  # type: ignore[attr-defined]
        due = [s.not_before.timestamp() for s in starts[1:]]  # type: ignore[attr-defined]
        assert due[1] - due[0] >= 4.0 - 1e-3, due
        assert [s.rate_limited for s in starts] == [None, "fe-imports", "fe-imports"]  # type: ignore[attr-defined]
        for handle in [first, *named, with_definition]:
            await client.terminate(handle.run_id, "test over")


async def test_a_child_of_a_singleton_workflow_is_refused_with_the_reason(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [parent, flows.one_per_customer]):
        await declared_by_worker(client, "one_per_customer")
        handle = await client.start(parent, "acme")
        outcome = await handle.result(timeout=10)
        assert "cannot be a child run" in outcome and "singleton" in outcome, outcome
        assert await client.list(workflow="one_per_customer") == []


async def test_children_of_a_rate_limited_workflow_are_delayed_and_keep_their_parent(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [import_parent, imports]):
        await declared_by_worker(client, "fe_imports")
        handle = await client.start(import_parent)

        async def both() -> list[Any] | None:
            try:
                found = [(await client.history(f"{handle.run_id}-c{i}"))[0] for i in (1, 2)]
            except RunNotFound:  # a child not started yet
                return None
            return found if all(found) else None

        starts = await wait_for(both, what="both children")
        assert all(s.parent == handle.run_id for s in starts)
        assert sorted(str(s.rate_limited) for s in starts) == ["None", "fe-imports"]
        await client.terminate(handle.run_id, "test over")


async def test_starts_through_the_engine_and_by_name_join_the_open_singleton_run(
    client: Client, nats_server: EmbeddedServer, engine: object
) -> None:
    async with running_worker(client, [flows.one_per_customer]):
        await declared_by_worker(client, "one_per_customer")
        first = await client.start(flows.one_per_customer, {"customer": "acme"})
        async with await Client.connect(nats_server.url, start_via_engine=True) as frontend:
            by_definition = await frontend.start(flows.one_per_customer, {"customer": "acme"})
            by_name = await frontend.start("one_per_customer", {"customer": "acme"})
            with pytest.raises(InvalidInput, match="run_id"):
                await frontend.start("one_per_customer", {"customer": "acme"}, run_id="mine")
        plain_by_name = await client.start("one_per_customer", {"customer": "acme"})
        assert {by_definition.run_id, by_name.run_id, plain_by_name.run_id} == {first.run_id}
        await client.signal(first.run_id, "go", "done")
        assert await first.result(timeout=10) == "done"


async def test_a_start_by_name_of_a_key_function_workflow_is_refused(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [flows.one_per_customer_fn]):
        await declared_by_worker(client, "one_per_customer_fn")
        async with await Client.connect(nats_server.url) as by_name:
            with pytest.raises(InvalidInput, match="function"):
                await by_name.start("one_per_customer_fn", {"customer": "acme"})


async def test_starts_by_name_of_an_unlimited_workflow_read_its_declaration_once(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [plain]):
        await declared_by_worker(client, "fe_plain")
        async with await Client.connect(nats_server.url) as by_name:
            reads: list[str] = []

            async def seen(msg: Any) -> None:
                reads.append(msg.subject)

            conn = by_name.connection
            sub = await conn.nc.subscribe(f"{conn.api}.DIRECT.GET.KV_{RATES_BUCKET}.>", cb=seen)
            await conn.nc.flush()
            handles = [await by_name.start("fe_plain", i) for i in range(10)]
            await conn.nc.flush()
            await sub.unsubscribe()
            assert [await h.result(timeout=10) for h in handles] == list(range(10))
        assert len(reads) == 1, reads  # "nothing" is cached: no read per start


async def test_a_schedule_that_skips_overlaps_waits_for_the_singleton_run_its_fires_joined(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [flows.one_per_customer]):
        await declared_by_worker(client, "one_per_customer")
        first = await client.start(flows.one_per_customer, {"customer": "acme"})
        await client.schedules.create(
            "fe-skip", flows.one_per_customer, {"customer": "acme"}, every=1
        )  # overlap="skip": a fire while the schedule's run is open is skipped

        async def joined_and_skipped() -> bool:
            actions = [f.action for f in (await client.schedules.describe("fe-skip")).recent_runs]
            return "started" in actions and "skipped" in actions

        # The first fire joined the open run (started elsewhere); the schedule waits for it.
        await wait_for(joined_and_skipped, timeout=15, what="a fire that joined, one skipped")
        await client.signal(first.run_id, "go", "done")
        assert await first.result(timeout=10) == "done"

        async def next_generation() -> list[Any]:
            return [
                r
                for r in await client.list(workflow="one_per_customer")
                if r.run_id != first.run_id
            ]

        (second,) = await wait_for(next_generation, timeout=15, what="the next run")
        await client.schedules.delete("fe-skip")
        await client.terminate(second.run_id, "test over")


async def test_natflow_start_by_name_joins_the_open_singleton_run(
    client: Client, nats_server: EmbeddedServer
) -> None:
    from tests.test_cli import natflow

    async with running_worker(client, [flows.one_per_customer]):
        await declared_by_worker(client, "one_per_customer")
        first = await client.start(flows.one_per_customer, {"customer": "acme"})
        again = await natflow(
            nats_server.url, "start", "one_per_customer", "--input", '{"customer": "acme"}'
        )
        assert again.returncode == 0, again.stderr.decode()
        assert f"exists: {first.run_id}" in again.stdout.decode()
        await client.terminate(first.run_id, "test over")


async def test_follow_ups_of_runs_closing_within_a_debounce_window_make_one_run(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [quick, digest]):
        await declared_by_worker(client, "fe_digest")
        handles = [await client.start(quick, i, on_complete=digest) for i in range(3)]
        assert [await h.result(timeout=10) for h in handles] == [0, 1, 2]

        async def follow_ups() -> list[Any]:
            return await client.list(workflow="fe_digest")

        (run,) = await wait_for(follow_ups, what="the debounced follow-up")
        assert await client.handle(run.run_id).result(timeout=15) in (0, 1, 2)

        async def settled() -> list[Any] | None:
            listed = await client.list(workflow="fe_digest")
            return listed if listed and all(r.status == "completed" for r in listed) else None

        assert [r.run_id for r in await wait_for(settled, what="the index")] == [run.run_id]


async def test_the_consoles_start_form_joins_the_open_singleton_run(
    client: Client, nats_server: EmbeddedServer, engine: object
) -> None:
    from tests.console_helpers import http, served_console

    async with (
        running_worker(client, [flows.one_per_customer]),
        served_console(nats_server.url) as base,
    ):
        await declared_by_worker(client, "one_per_customer")
        first = await client.start(flows.one_per_customer, {"customer": "acme"})
        form = {
            "workflow": "one_per_customer",
            "queue": "",
            "run_id": "",
            "input": '{"customer": "acme"}',
        }
        status, body, headers = await http(base + "/start", form)
        assert status in (200, 303), body
        assert first.run_id in body + headers.get("location", "") + headers.get("Location", "")
        assert [r.run_id for r in await client.list(workflow="one_per_customer")] == [first.run_id]
        await client.terminate(first.run_id, "test over")


async def test_a_worker_declaring_while_the_bucket_has_no_leader_waits_it_out(
    client: Client,
) -> None:
    """A worker started while its cluster elects the rates bucket's leader (a node just died)
    got "no responders" for its flow declaration and died of it (seen in
    test_topologies' node kill). The bucket missing for a moment answers the same way."""
    from natflow_engine import ensure_streams, publish_declarations
    from natflow_engine._flow_decls import FlowDeclaration, declaration_key
    from natflow_engine._kv import kv_stream
    from natflow_engine._streams import stream_configs

    conn = client.connection
    await ensure_streams(conn)
    bucket = kv_stream(RATES_BUCKET)
    await conn.jsm.delete_stream(bucket)

    async def bucket_back() -> None:
        await anyio.sleep(0.5)
        await conn.jsm.add_stream(next(c for c in stream_configs() if c.name == bucket))

    async with anyio.create_task_group() as tg:
        tg.start_soon(bucket_back)
        await publish_declarations(conn, [FlowDeclaration(workflow="late_bucket")])
    assert await kv_get(conn, RATES_BUCKET, declaration_key("late_bucket")) is not None


async def test_start_requests_any_client_can_send_are_answered_never_fatal(
    client: Client, engine: object
) -> None:
    """The start service takes requests from frontends natflow does not control: a body
    that is not UTF-8 ended the engine (the requester timed out); now an ``invalid`` reply.
    A request's own flow declaration is not applied (one with a window past the year 9999
    ended the engine too; a forged rate limit could push another workflow's starts back
    for days): the declaration its workers published is."""
    from natflow_engine._start_service import StartReply, start_subject

    nc = client.connection.nc
    msg = await nc.request(
        start_subject("hostile-0"), b'{"workflow": "q\xff", "queue": "default"}', timeout=5
    )
    reply = msgspec.json.decode(msg.data, type=StartReply)
    assert reply.invalid and "utf-8" in reply.error, reply
    forged = {
        "debounce": 1e300,
        "rate": {"name": "shared-with-others", "limit": 1, "period": 86400.0},
    }
    for i, flow in enumerate(forged.items()):
        body = {"workflow": "quick", "queue": "q", "flow": {"workflow": "quick", flow[0]: flow[1]}}
        msg = await nc.request(start_subject(f"forged-{i}"), msgspec.json.encode(body), timeout=5)
        reply = msgspec.json.decode(msg.data, type=StartReply)
        assert reply.created and reply.run_id == f"forged-{i}", reply
        info = await client.describe(reply.run_id)
        assert info.status == "pending" and "rate limited" not in (info.current or ""), info
    assert await kv_entries(client.connection, RATES_BUCKET, "shared-with-others.>") == []


async def redeliver(client: Client, name: str, event_id: str, body: bytes) -> None:
    """The event again, as after the stream's two-minute duplicate window: a new
    ``Nats-Msg-Id`` (the stream stores it again), the same event id."""
    headers = {"Nats-Msg-Id": f"again-{event_id}", EVENT_ID_HEADER: event_id}
    ack = await client.connection.js.publish(f"natflow.event.{name}", body, headers=headers)
    assert not ack.duplicate


async def test_an_event_again_after_the_duplicate_window_starts_no_second_singleton_run(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [single_on_event]):
        await declared_by_worker(client, "fe_single_ev")
        await client.emit("fe.single", {"n": 1}, event_id="e-1")

        async def closed(count: int) -> list[RunInfo] | None:
            runs = await client.list(workflow="fe_single_ev")
            done = [r for r in runs if r.status == "completed"]
            return runs if len(done) == count else None

        (first,) = await wait_for(lambda: closed(1), what="the first event's run")
        await redeliver(client, "fe.single", "e-1", b'{"n": 1}')
        await client.emit("fe.single", {"n": 2}, event_id="e-2")  # taken after the one above
        runs = await wait_for(lambda: closed(2), what="the second event's run")
        assert sorted(r.result for r in runs) == [1, 2]  # not a third run for e-1
        records = await recent_events(client.connection)
        assert [r.event_id for r in records] == ["e-2", "e-1", "e-1"]
        assert records[2].runs == records[1].runs == {"fe_single_ev": first.run_id}
        assert records[0].runs["fe_single_ev"] not in (None, first.run_id)


async def test_an_event_again_takes_no_slot_of_its_workflows_rate_limit(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [rated_on_event]):
        await declared_by_worker(client, "fe_rated_ev")
        seq = await client.emit("fe.rated", {"n": 1}, event_id="r-1")
        first = event_run_id("fe.rated", "r-1", seq, "fe_rated_ev")
        await wait_for(lambda: closed_run(client, first), what="the first event's run")
        await redeliver(client, "fe.rated", "r-1", b'{"n": 1}')
        seq = await client.emit("fe.rated", {"n": 2}, event_id="r-2")
        second = event_run_id("fe.rated", "r-2", seq, "fe_rated_ev")
        # Two slots at once (burst 2): the second event's run is not put off by a minute.
        await wait_for(lambda: closed_run(client, second), timeout=15, what="the second run")


async def closed_run(client: Client, run_id: str) -> bool:
    try:
        return (await client.describe(run_id)).status == "completed"
    except RunNotFound:
        return False
