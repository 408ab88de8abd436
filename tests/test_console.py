"""The console (issue 15) in a real Chromium: open the runs page, click a running run, watch
its steps appear live, signal it from the page and see it resume, cancel one and see it end.
Also: bad input anywhere gets a clear message on the page, never a traceback; the access
token; the start form checked against the announced input schema; screenshots for the README.

Against a real nats-server, with the engine, a worker and the console in this process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from natflow import Client
from natflow_engine._registry import WorkerInfo, announce
from natflow_engine._server import EmbeddedServer

from tests.console_helpers import chromium, http, served_console
from tests.helpers import ROOT, running_worker, stop, wait_for
from tests.workflows_console import GATES, WORKFLOWS, approval, checkout, greet, pipeline


@pytest.fixture
async def console(nats_server: EmbeddedServer, engine: Any, client: Client) -> AsyncIterator[str]:
    """Engine, a worker for the test workflows, and the console; yields the console's URL."""
    async with (
        running_worker(client, WORKFLOWS, queue="console"),
        served_console(nats_server.url) as base,
    ):
        yield base


async def _status(page: Any) -> str:
    status: str = await page.get_attribute("#run-status", "data-status")
    return status


async def test_runs_page_to_a_live_run(console: str, client: Client, tmp_path: Path) -> None:
    """Click a running run on the runs page; its steps appear as they complete, no reload."""
    handle = await client.start(pipeline, {"stages": 3}, run_id="pipeline-live")
    await wait_for(lambda: _is(client, handle.run_id, "running"), what="the run to start")
    async with chromium(tmp_path / "profile") as page:
        await page.goto(f"{console}/runs")
        await page.locator('a.mono:text-is("pipeline-live")').click()
        await page.wait_for_url(f"{console}/runs/pipeline-live")
        await page.evaluate("window.__sameDocument = true")
        completed = page.locator('#steps tr.step[data-status="completed"]')
        assert await completed.count() == 0
        for stage in (1, 2, 3):
            GATES[handle.run_id, stage].set()
            await page.locator(
                f'#steps tr.step[data-step="stage-{stage}"][data-status="completed"]'
            ).wait_for()
            assert await completed.count() == stage
        await page.locator('#run-status[data-status="completed"]').wait_for()
        assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"
        assert '"stages": 3' in await page.inner_text("#outcome")
        assert await page.locator("#timeline .tl-bar").count() == 3


async def _is(client: Client, run_id: str, status: str) -> bool:
    return (await client.describe(run_id)).status == status


async def test_signal_from_the_page_resumes_the_run(
    console: str, client: Client, tmp_path: Path
) -> None:
    handle = await client.start(approval, {"order": "B-7"}, run_id="needs-approval")
    await wait_for(lambda: _is(client, handle.run_id, "waiting"), what="the signal wait")
    async with chromium(tmp_path / "profile") as page:
        await page.goto(f"{console}/runs/needs-approval")
        assert await _status(page) == "waiting"
        await page.fill('.signal-form input[name="name"]', "approved")
        await page.fill('.signal-form textarea[name="payload"]', "{by: ana}")  # not JSON
        await page.click('.signal-form button[type="submit"]')
        error = page.locator(".signal-form .field-error")
        await error.wait_for()
        assert "Not valid JSON" in await error.inner_text()
        assert page.url.endswith("/runs/needs-approval"), "bad JSON must not be sent"
        await page.fill('.signal-form textarea[name="payload"]', '{"by": "ana"}')
        await page.click('.signal-form button[type="submit"]')
        await page.locator(".notice").wait_for()
        assert "Signal 'approved' sent" in await page.inner_text(".notice")
        await page.locator('#run-status[data-status="completed"]').wait_for()
        assert '"approved_by"' in await page.inner_text("#outcome")
        assert "ana" in await page.inner_text("#outcome")
        assert await page.locator('#steps tr.step[data-step="ship"]').count() == 1
    assert (await handle.result(timeout=5))["approved_by"] == {"by": "ana"}


async def test_cancel_from_the_page_ends_the_run(
    console: str, client: Client, tmp_path: Path
) -> None:
    handle = await client.start(approval, {"order": "C-1"}, run_id="to-cancel")
    await wait_for(lambda: _is(client, handle.run_id, "waiting"), what="the signal wait")
    async with chromium(tmp_path / "profile") as page:
        await page.goto(f"{console}/runs/to-cancel")
        await page.fill('form[action$="/action/cancel"] input[name="reason"]', "customer left")
        await page.click('form[action$="/action/cancel"] button')
        await page.locator('#run-status[data-status="cancelled"]').wait_for()
        assert "customer left" in await page.inner_text("#outcome")
        assert "nothing more can be done" in await page.inner_text("#actions")
    assert (await client.describe("to-cancel")).status == "cancelled"
