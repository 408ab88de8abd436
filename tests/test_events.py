"""Event triggers (issue 14): a plain nats-py publisher on ``natflow.event.<name>`` starts one
run per declared workflow; the same ``Nats-Msg-Id`` again starts nothing; a body that is not
JSON, or does not fit a workflow's input, is dead-lettered with the reason and starts nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anyio
import nats
import pytest
from natflow import Client, InvalidInput, RunInfo, RunNotFound
from natflow_engine import ensure_streams
from natflow_engine._server import EmbeddedServer
from natflow_engine._signals import dead_letters
from natflow_engine._triggers import (
    BadEvent,
    TriggerDeclaration,
    check_body,
    declarations,
    event_run_id,
    recent_events,
)
from natflow_engine.events import RunStarted
from prometheus_client import REGISTRY

from tests.helpers import running_worker, wait_for
from tests.workflows_triggers import WORKFLOWS


@pytest.fixture
async def plain(nats_server: EmbeddedServer) -> AsyncIterator[Any]:
    """A plain nats-py JetStream context: no natflow code on the publishing side."""
    nc = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def result_of(client: Client, run_id: str) -> Any:
    """The result of a run the engine starts by itself (waits for it to exist first)."""

    async def exists() -> bool:
        try:
            await client.describe(run_id)
        except RunNotFound:
            return False
        return True

    await wait_for(exists, what=f"run {run_id}")
    return await client.handle(run_id).result(timeout=10)


async def both_declared(client: Client) -> list[Any]:
    found = await declarations(client.connection, "order.created")
    return found if len(found) == 2 else []


async def event_runs(client: Client, seq: int) -> list[RunInfo]:
    return [
        r
        for r in await client.list(limit=1000)
        if r.trigger is not None and r.trigger.kind == "event" and r.trigger.event_seq == seq
    ]


async def test_a_plain_publisher_starts_one_run_per_declared_workflow(
    client: Client, engine: object, plain: Any
) -> None:
    async with running_worker(client, WORKFLOWS):
        declared = await wait_for(lambda: both_declared(client), what="declarations")
        assert sorted(d.workflow for d in declared) == ["audit", "fulfil"]
        body = json.dumps({"order_id": "A-1", "total": 12.5}).encode()
        ack = await plain.publish(
            "natflow.event.order.created", body, headers={"Nats-Msg-Id": "order-A-1"}
        )
        assert ack.stream == "NATFLOW_EVENTS" and not ack.duplicate
        fulfil = client.handle(event_run_id("order.created", "order-A-1", ack.seq, "fulfil"))
        audit = client.handle(event_run_id("order.created", "order-A-1", ack.seq, "audit"))
        assert await result_of(client, fulfil.run_id) == "fulfilled A-1"
        assert await result_of(client, audit.run_id) == {"order_id": "A-1", "total": 12.5}
        info = await fulfil.status()
        assert info.trigger is not None and info.trigger.event == "order.created"
        assert info.trigger.event_seq == ack.seq

        # The same message again, with the same Nats-Msg-Id: the stream keeps one copy.
        again = await plain.publish(
            "natflow.event.order.created", body, headers={"Nats-Msg-Id": "order-A-1"}
        )
        assert again.duplicate and again.seq == ack.seq
        # From the client, an event only audit declared; then the next event after both, so
        # the intake has read past the duplicate when we count.
        seq = await client.emit("order.cancelled", {"order_id": "A-1"}, event_id="cancel-A-1")
        await result_of(client, event_run_id("order.cancelled", "cancel-A-1", seq, "audit"))
        runs = await wait_for(lambda: _at_least(client, ack.seq, 2), what="both runs indexed")
        assert sorted(r.workflow for r in runs) == ["audit", "fulfil"]
        assert [r.workflow for r in await event_runs(client, seq)] == ["audit"]

        # After the stream's duplicate window (shortened here to 1 s), the same Nats-Msg-Id is
        # stored again as a new message: its runs are the ones that exist, nothing new starts.
        config = (await client.connection.jsm.stream_info("NATFLOW_EVENTS")).config
        config.duplicate_window = 1.0
        await client.connection.jsm.update_stream(config)
        # The server drops expired ids on its own timer, so the window may end a little late
        # on a busy machine: publish (a duplicate stores nothing) until it is stored again.
        acks: list[Any] = []

        async def stored_again() -> bool:
            acks.append(
                await plain.publish(
                    "natflow.event.order.created", body, headers={"Nats-Msg-Id": "order-A-1"}
                )
            )
            return not acks[-1].duplicate

        await wait_for(stored_again, timeout=15, what="the duplicate window to pass")
        late = acks[-1]
        assert not late.duplicate and late.seq > seq
        marker = await client.emit("order.cancelled", {"order_id": "A-1"}, event_id="marker")
        await result_of(client, event_run_id("order.cancelled", "marker", marker, "audit"))
        for handle in (fulfil, audit):  # the runs the id derives to are the first event's
            run = await handle.status()
            assert run.trigger is not None and run.trigger.event_seq == ack.seq
            history = await client.history(handle.run_id)
            assert sum(isinstance(e, RunStarted) for e in history) == 1
        assert await event_runs(client, late.seq) == []

        records = await recent_events(client.connection, limit=10)
        assert [r.name for r in records] == [
            "order.cancelled",
            "order.created",
            "order.cancelled",
            "order.created",
        ]
        both = {"audit": audit.run_id, "fulfil": fulfil.run_id}
        assert records[1].runs == records[3].runs == both  # the republished one: same runs


async def _at_least(client: Client, seq: int, n: int) -> list[RunInfo]:
    runs = await event_runs(client, seq)
    return runs if len(runs) >= n else []


async def test_a_malformed_body_is_dead_lettered_and_starts_nothing(
    client: Client, engine: object, plain: Any
) -> None:
    async with running_worker(client, WORKFLOWS):
        await wait_for(lambda: both_declared(client), what="declarations")
        not_json = await plain.publish("natflow.event.order.created", b"{not json")
        # msgspec raises UnicodeDecodeError for this, not DecodeError: it was retried every
        # 10 s for good, with a traceback each time, and never dead-lettered
        not_utf8 = await plain.publish("natflow.event.order.created", b'"\xff"')
        too_deep = await plain.publish("natflow.event.order.created", b"[" * 200_000)
        wrong = await plain.publish(
            "natflow.event.order.created", json.dumps({"order_id": 7}).encode()
        )

        async def letters() -> list[Any]:
            found = [d for d in await dead_letters(client.connection) if d.kind == "event"]
            return found if len(found) >= 4 else []

        found = await wait_for(letters, what="four dead letters")
        by_seq = {d.signal_seq: d for d in found}
        assert "body is not JSON" in by_seq[not_json.seq].reason
        assert "body is not JSON" in by_seq[not_utf8.seq].reason
        assert "body is not JSON" in by_seq[too_deep.seq].reason
        reason = by_seq[wrong.seq].reason
        assert "workflow 'fulfil'" in reason and "total" in reason
        # audit takes any JSON object, so the second event started audit and not fulfil
        assert await result_of(client, event_run_id("order.created", None, wrong.seq, "audit")) == {
            "order_id": 7
        }
        await anyio.sleep(0.3)
        assert [r.workflow for r in await event_runs(client, wrong.seq)] == ["audit"]
        assert await event_runs(client, not_json.seq) == []
        assert (REGISTRY.get_sample_value("natflow_events_rejected_total") or 0) >= 3


async def test_emit_checks_the_event_name(client: Client) -> None:
    with pytest.raises(InvalidInput, match="invalid event name"):
        await client.emit("order..created", {})
    with pytest.raises(InvalidInput, match="invalid event name"):
        await client.emit("order.*", {})
    with pytest.raises(InvalidInput, match="event_id must be"):
        await client.emit("order.created", {}, event_id="")
    from natflow_engine._triggers import emit

    with pytest.raises(InvalidInput, match="event_id must be"):  # what the CLI calls
        await emit(client.connection, "order.created", b"{}", "x" * 5000)


async def test_no_events_yet_lists_nothing(client: Client) -> None:
    await ensure_streams(client.connection)
    assert await recent_events(client.connection) == []


def test_a_declared_schema_that_is_not_json_schema_rejects_the_body_not_the_intake() -> None:
    decl = TriggerDeclaration(
        event="e",
        workflow="w",
        queue="q",
        input_schema={"type": 5},
        declared_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    with pytest.raises(BadEvent, match="not valid JSON Schema"):
        check_body(decl, {"a": 1})


def test_a_body_is_checked_against_its_schemas_formats() -> None:
    """A "uuid" field given "not-a-uuid" passed (formats unchecked): a run was started that
    failed on its input once a worker decoded it, instead of a dead letter."""
    decl = TriggerDeclaration(
        event="e",
        workflow="w",
        queue="q",
        input_schema={"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}},
        declared_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    check_body(decl, {"id": "0b7e1f3c-6a4e-4d6b-9a53-2f1c3d4e5f60"})
    with pytest.raises(BadEvent, match="uuid"):
        check_body(decl, {"id": "not-a-uuid"})


async def test_one_event_id_for_two_events_starts_both_and_bad_entries_block_nothing(
    client: Client, engine: object, plain: Any
) -> None:
    """JetStream drops a repeated Nats-Msg-Id across the whole stream: an order's id used
    for its created and cancelled events lost the second. An unreadable declaration stopped
    every start of its event (and `events` commands); an event no workflow declares was
    acknowledged unseen."""
    async with running_worker(client, WORKFLOWS):
        await wait_for(lambda: both_declared(client), what="declarations")
        # A bad entry beside the good ones: skipped, and removable.
        await client.connection.publish(
            "$KV.natflow_triggers.order.created.deadbeefdeadbeef", b"not json at all"
        )
        created = await client.emit(
            "order.created", {"order_id": "B-2", "total": 1.0}, event_id="B-2"
        )
        cancelled = await client.emit("order.cancelled", {"order_id": "B-2"}, event_id="B-2")
        assert cancelled != created
        for name, seq, workflow in (
            ("order.created", created, "fulfil"),
            ("order.cancelled", cancelled, "audit"),
        ):
            await result_of(client, event_run_id(name, "B-2", seq, workflow))
        records = await recent_events(client.connection, limit=5)
        assert {r.name for r in records} >= {"order.created", "order.cancelled"}
        # An event nobody declares: a dead letter that says so.
        lonely = await plain.publish("natflow.event.order.lost", b"{}")

        async def said() -> list[Any]:
            return [
                d
                for d in await dead_letters(client.connection)
                if d.kind == "event" and d.signal_seq == lonely.seq
            ]

        (letter,) = await wait_for(said, what="the undeclared event's dead letter")
        assert "no workflow declares event 'order.lost'" in letter.reason
