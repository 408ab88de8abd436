"""``natflow schedules ...``, ``natflow events ...`` and the trigger line of ``runs show``."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from natflow import Client
from natflow_engine._server import EmbeddedServer
from natflow_engine._triggers import TriggerDeclaration, declare

from tests.helpers import running_worker, wait_for
from tests.test_cli import assert_one_clear_error, natflow, out
from tests.workflows_triggers import WORKFLOWS


async def test_schedule_commands(client: Client, nats_server: EmbeddedServer) -> None:
    url = nats_server.url
    created = await natflow(
        url, "schedules", "create", "berlin", "tick", "--cron", "0 3 * * *",
        "--timezone", "Europe/Berlin", "--queue", "sched", "--overlap", "buffer_one",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr.decode()
    assert "schedule  berlin" in out(created) and "next    " in out(created)
    listed = await natflow(url, "schedules", "list")
    assert "berlin" in out(listed) and "0 3 * * * Europe/Berlin" in out(listed)
    described = json.loads(out(await natflow(url, "schedules", "describe", "berlin", "--json")))
    assert described["spec"]["overlap"] == "buffer_one"
    assert len(described["next_fire_times"]) == 5
    # Every field, defaults too (a schedule is stored without them: no every, jitter, ...).
    assert described["spec"]["every"] is None and described["spec"]["jitter"] == 0.0
    every = await natflow(url, "schedules", "create", "often", "tick", "--every", "60")
    assert every.returncode == 0, every.stderr.decode()
    [listed_often] = [
        s
        for s in json.loads(out(await natflow(url, "schedules", "list", "--json")))
        if s["schedule_id"] == "often"
    ]
    assert listed_often["spec"]["queue"] == "default" and listed_often["spec"]["cron"] is None
    assert (await natflow(url, "schedules", "delete", "often")).returncode == 0
    assert (await natflow(url, "schedules", "pause", "berlin")).returncode == 0
    assert (await client.schedules.describe("berlin")).paused
    assert (await natflow(url, "schedules", "resume", "berlin")).returncode == 0
    backfilled = await natflow(
        url, "schedules", "backfill", "berlin", "2026-03-28T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
    )  # fmt: skip
    # 03:00 local on the 28th (CET) and on the 29th, the day the clocks went forward (CEST)
    assert out(backfilled).split() == [
        "started:", "berlin-20260328T020000Z", "started:", "berlin-20260329T010000Z",
    ]  # fmt: skip
    triggered = await natflow(url, "schedules", "trigger", "berlin")
    assert out(triggered).startswith("started: berlin-")
    assert_one_clear_error(
        await natflow(url, "schedules", "create", "x", "tick", "--cron", "nope"), "invalid cron"
    )
    assert_one_clear_error(await natflow(url, "schedules", "describe", "nope"), "no schedule")
    assert (await natflow(url, "schedules", "delete", "berlin")).returncode == 0


async def test_event_commands_and_runs_show(
    client: Client, nats_server: EmbeddedServer, engine: object
) -> None:
    url = nats_server.url
    async with running_worker(client, WORKFLOWS):

        async def declared() -> str:
            text = out(await natflow(url, "events", "triggers"))
            return text if "fulfil" in text and "audit" in text else ""

        await wait_for(declared, timeout=20, what="declarations")
        emitted = await natflow(
            url, "events", "emit", "order.created", '{"order_id": "B-2", "total": 3}',
            "--event-id", "b2",
        )  # fmt: skip
        assert out(emitted).startswith("stored: #")

        async def both_started() -> str:
            text = out(await natflow(url, "events", "list"))
            return text if "none" not in text and "fulfil: ev-" in text else ""

        listing = await wait_for(both_started, timeout=20, what="runs of the event")
        assert "order.created" in listing and "audit: ev-" in listing
        run_id = listing.split("fulfil: ")[1].split()[0].rstrip(",")
        await wait_for(lambda: _closed(client, run_id), what="the run to finish")
        shown = out(await natflow(url, "runs", "show", run_id))
        assert "started by event order.created (#1 in NATFLOW_EVENTS)" in shown
    undeclared = await natflow(url, "events", "undeclare", "order.created", "audit")
    assert out(undeclared) == "undeclared: audit on order.created\n"
    triggers = out(await natflow(url, "events", "triggers"))
    assert "fulfil" in triggers and "audit" in triggers  # audit is still on order.cancelled
    assert "order.created            audit" not in triggers
    assert_one_clear_error(
        await natflow(url, "events", "undeclare", "order.created", "audit"), "does not start"
    )


async def _closed(client: Client, run_id: str) -> bool:
    return (await client.describe(run_id)).is_closed


def assert_columns_align(text: str, *columns: str) -> None:
    """Every row's cells start where the header's column names do."""
    header, *rows = text.splitlines()
    starts = [header.index(column) for column in columns]
    assert rows, text
    for row in rows:
        for start in starts:
            assert row[start - 2 : start] == "  " and row[start] != " ", (start, text)


async def test_schedule_and_event_lists_align_their_columns_whatever_the_widths(
    client: Client, nats_server: EmbeddedServer
) -> None:
    url = nats_server.url
    for schedule_id, workflow, zone in (
        ("a-schedule-id-longer-than-its-column", "a-workflow-name-longer-than-18", "UTC"),
        ("short", "tick", "America/Argentina/Buenos_Aires"),
    ):
        created = await natflow(
            url, "schedules", "create", schedule_id, workflow, "--cron", "0 3 * * *",
            "--timezone", zone,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr.decode()
    listed = out(await natflow(url, "schedules", "list"))
    assert_columns_align(listed, "WORKFLOW", "WHEN", "STATE", "NEXT FIRE")
    for name in ("an.event.name.longer.than.its.column", "short"):
        assert (await natflow(url, "events", "emit", name, "{}")).returncode == 0
    events = out(await natflow(url, "events", "list"))
    assert_columns_align(events, "EVENT", "STORED", "RUNS")
    for event, workflow in (("an.event.name.longer.than.its.column", "w"), ("e", "wf-" * 10)):
        await declare(
            client.connection,
            TriggerDeclaration(
                event=event,
                workflow=workflow,
                queue="a-queue-name-longer-than-12",
                declared_by="tester",
                declared_at=datetime.now(UTC),
            ),
        )
    triggers = out(await natflow(url, "events", "triggers"))
    assert_columns_align(triggers, "WORKFLOW", "QUEUE", "DECLARED BY")
