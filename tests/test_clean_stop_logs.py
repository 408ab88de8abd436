"""A worker stopped cleanly logs no lost connection: closing its own connections is no loss."""

from __future__ import annotations

import logging

import pytest
from natflow import Client, WorkflowContext, workflow

from tests.helpers import running_worker


@workflow
async def quick(ctx: WorkflowContext, input: None) -> str:
    return "done"


async def test_a_clean_stop_logs_no_lost_connection(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="natflow")
    async with running_worker(client, [quick]):
        handle = await client.start(quick, run_id="clean-stop-1")
        assert await handle.result(timeout=10) == "done"
    said = [r.getMessage() for r in caplog.records if r.name.startswith("natflow")]
    assert not [line for line in said if "connection lost" in line], said
