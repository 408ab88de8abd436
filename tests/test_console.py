"""The console (issue 15) in a real Chromium: open the runs page, click a running run, watch
its steps appear live, signal it from the page and see it resume, cancel one and see it end.
Also: bad input anywhere gets a clear message on the page, never a traceback; the access
token; the start form checked against the announced input schema; screenshots for the README.

Against a real nats-server, with the engine, a worker and the console in this process.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from natflow import Client
from natflow_engine._registry import WorkerInfo, announce, ping_subject
from natflow_engine._runs import Runs
from natflow_engine._server import EmbeddedServer

from tests.console_helpers import chromium, http, served_console
from tests.helpers import ROOT, running_worker, stop, wait_for
from tests.links import free_port
from tests.workflows_console import GATES, WORKFLOWS, approval, checkout, greet, pipeline


@pytest.fixture
async def console(nats_server: EmbeddedServer, engine: Any, client: Client) -> AsyncIterator[str]:
    """Engine, a worker for the test workflows, and the console; yields the console's URL."""
    async with (
        running_worker(client, WORKFLOWS, queue="console"),
        served_console(nats_server.url) as base,
    ):
        yield base


@pytest.fixture(scope="module")
async def browser(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    """One Chromium for the module (a fresh profile); each test opens its own page."""
    async with chromium(tmp_path_factory.mktemp("chromium") / "profile") as context:
        yield context


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    opened = await browser.new_page()
    try:
        yield opened
    finally:
        await opened.close()


async def _status(page: Any) -> str:
    status: str = await page.get_attribute("#run-status", "data-status")
    return status


async def test_runs_page_to_a_live_run(console: str, client: Client, page: Any) -> None:
    """Click a running run on the runs page; its steps appear as they complete, no reload."""
    handle = await client.start(pipeline, {"stages": 3}, run_id="pipeline-live")
    await wait_for(lambda: _is(client, handle.run_id, "running"), what="the run to start")
    workers = (await http(f"{console}/workers"))[1]
    assert 'href="/runs/pipeline-live"' in workers, "the worker holding the run lists it"
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
    console: str, client: Client, page: Any
) -> None:
    handle = await client.start(approval, {"order": "B-7"}, run_id="needs-approval")
    await wait_for(lambda: _is(client, handle.run_id, "waiting"), what="the signal wait")
    await page.goto(f"{console}/runs/needs-approval")
    assert await _status(page) == "waiting"
    assert await page.locator("#timeline .tl-bar.k-signal.open").count() == 1
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
    assert await page.locator("#timeline .tl-bar.k-signal.b-completed").count() == 1
    assert (await handle.result(timeout=5))["approved_by"] == {"by": "ana"}


async def test_cancel_from_the_page_ends_the_run(console: str, client: Client, page: Any) -> None:
    handle = await client.start(approval, {"order": "C-1"}, run_id="to-cancel")
    await wait_for(lambda: _is(client, handle.run_id, "waiting"), what="the signal wait")
    await page.goto(f"{console}/runs/to-cancel")
    await page.fill('form[action$="/action/cancel"] input[name="reason"]', "customer left")
    await page.click('form[action$="/action/cancel"] button')
    await page.locator('#run-status[data-status="cancelled"]').wait_for()
    assert "customer left" in await page.inner_text("#outcome")
    actions = await page.inner_text("#actions")
    assert "it takes no more signals" in actions and "Restart" in actions
    assert "Send signal" not in actions and "Cancel run" not in actions
    assert (await client.describe("to-cancel")).status == "cancelled"


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#39;", "'")


async def test_bad_input_gets_a_message_on_the_page_never_a_traceback(
    console: str, client: Client
) -> None:
    handle = await client.start(approval, {"order": "D-1"}, run_id="bad-input")
    await wait_for(lambda: _is(client, handle.run_id, "waiting"), what="the signal wait")
    cases: list[tuple[str, dict[str, str] | None, int, str]] = [
        ("/runs?since=yesterday-ish", None, 400, "since 'yesterday-ish' is not a time"),
        ("/runs?status=sleepy", None, 400, "status 'sleepy' is not one of"),
        ("/runs?workflow=a%0Ab", None, 400, "invalid workflow name 'a\\nb'"),
        ("/runs?before=abc", None, 400, "is not a page position"),
        ("/runs?before=%C2%B2", None, 400, "is not a page position"),  # isdigit(), not int()
        ("/runs?offset=" + "9" * 5000 + "&status=pending", None, 400, "is not a page position"),
        ("/runs?since=99999999999d", None, 400, "more than a hundred years ago"),
        ("/runs/a%20b/live", None, 400, "run_id 'a b': use 1 to 128 characters"),
        ("/runs?run_id=no-such-run", None, 404, "no run id contains 'no-such-run'"),
        ("/runs/no-such-run", None, 404, "no run with id 'no-such-run'"),
        ("/runs/bad.id", None, 400, "run_id 'bad.id': use 1 to 128 characters"),
        ("/nowhere", None, 404, "Not found"),
        ("/runs/bad-input/signal", {"name": "approved", "payload": "{by: x}"}, 400,
         "the payload is not valid JSON"),
        ("/runs/bad-input/signal", {"name": "", "payload": ""}, 400, "the signal needs a name"),
        ("/runs/bad-input/signal", {"name": "a b", "payload": ""}, 400, "invalid signal name"),
        ("/runs/bad-input/action/explode", {}, 400, "there is no action 'explode'"),
        ("/start", {"workflow": "", "input": ""}, 400, "workflow name"),
        ("/start", {"workflow": "greet", "input": "[1,"}, 400, "the input is not valid JSON"),
        ("/start", {"workflow": "greet", "queue": "a b", "input": "{}"}, 400, "queue"),
    ]  # fmt: skip
    for path, form, status, message in cases:
        got, body, _ = await http(console + path, form)
        assert got == status, (path, got, _text(body)[:300])
        assert message in _text(body), (path, _text(body)[:600])
        assert "Traceback" not in body and 'File "' not in body
    # a history the console cannot read: a page that says so, the details only in the log
    await client.connection.publish("natflow.history.garbled.run", b"not an event", {})
    got, body, _ = await http(console + "/runs/garbled")
    assert got == 502 and "cannot be decoded" in body, _text(body)[:600]
    assert "Traceback" not in body and "msgspec" not in body
    # a form sent from another site is refused
    got, body, _ = await http(
        console + "/runs/bad-input/action/cancel", {}, {"Origin": "http://evil.example"}
    )
    assert got == 403 and "another site" in _text(body)
    assert (await client.describe("bad-input")).status == "waiting", "nothing was sent"
    # a page whose DNS name was rebound to this machine: same-origin to the browser, yet
    # refused (a console without an access token answers only to an address or localhost)
    rebound = {"Host": "evil.example", "Origin": "http://evil.example"}
    for path, form in (("/runs", None), ("/runs/bad-input/action/cancel", {})):
        got, body, _ = await http(console + path, form, rebound)
        assert got == 400 and "answers only to an IP address or localhost" in _text(body)
    got, _, _ = await http(console + "/runs", headers={"Host": "localhost"})
    assert got == 200
    assert (await client.describe("bad-input")).status == "waiting", "nothing was sent"
    # any printable workflow name is a filter; the run page links to it
    await Runs(client.connection).start("billing.invoice&co", "nobody", b"{}", "dotted")
    got, body, _ = await http(console + "/runs/dotted")
    assert got == 200 and 'href="/runs?workflow=billing.invoice%26co"' in body, body
    got, body, _ = await http(console + "/runs?workflow=billing.invoice%26co")
    assert got == 200 and "dotted" in body
    # a large payload from the signal form goes to the value store, as Client.signal's does
    big = '{"note": "' + "x" * 100_000 + '"}'
    got, _, _ = await http(console + "/runs/bad-input/signal", {"name": "other", "payload": big})
    assert got == 303
    stored = await client.connection.js.get_last_msg(
        "NATFLOW_SIGNALS", "natflow.signal.bad-input.>"
    )
    assert len(stored.data or b"") < 1000, len(stored.data or b"")


async def test_start_form_checks_the_announced_input_schema(
    nats_server: EmbeddedServer, console: str, client: Client, page: Any
) -> None:
    """A worker that announces an input schema: the form refuses input that does not fit,
    naming the field, and starts the run when it fits."""
    now = datetime.now(UTC)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "minLength": 1}},
        "required": ["name"],
    }
    # a worker that announces a schema (and answers the engine's pings, so it counts as live)
    nc = client.connection.nc

    async def pong(msg: Any) -> None:
        await msg.respond(b"")

    await nc.subscribe(ping_subject("schema-worker"), cb=pong)
    await announce(
        client.connection,
        WorkerInfo(
            identity="schema-worker",
            host="test",
            pid=os.getpid(),
            queues=["console"],
            workflows=["greet"],
            started_at=now,
            heartbeat_at=now,
            lease_ttl=30,
            input_schemas={"greet": schema},
        ),
    )
    await page.goto(f"{console}/start?workflow=greet")
    # The fixture's worker serves greet too (any object): input fitting neither is refused.
    await page.fill('textarea[name="input"]', "[7]")
    await page.click(".start-form button")
    await page.locator(".error-box").wait_for()
    refusal = await page.inner_text(".error-box")
    assert "the input does not fit workflow 'greet'" in refusal
    assert "its workers announce 2 input types; it fits none" in refusal
    assert await page.input_value('textarea[name="input"]') == "[7]", "input kept"
    await page.fill('textarea[name="input"]', '{"name": "Ana"}')
    await page.fill('input[name="run_id"]', "from-the-form")
    await page.click(".start-form button")
    await page.wait_for_url(re.compile(r"/runs/from-the-form"))
    await page.locator('#run-status[data-status="completed"]').wait_for()
    assert "hello Ana" in await page.inner_text("#outcome")


async def test_access_token_and_natflow_ui(nats_server: EmbeddedServer, tmp_path: Path) -> None:
    """`natflow ui --access-token`: without the token every page says how to get in; with it
    (once, as ?token=) a cookie lets the browser in; the token is never printed."""
    port = free_port()
    secret = "s3cret-console-token"
    log = tmp_path / "ui.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 (a real process, started once)
            [sys.executable, "-m", "natflow_engine", "--url", nats_server.url, "ui",
             "--port", str(port), "--access-token", secret],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"

        async def listening() -> bool:
            return "natflow console at" in log.read_text()

        await wait_for(listening, timeout=30, what="natflow ui to listen")
        got, body, _ = await http(base + "/runs")
        assert got == 401 and "needs its access token" in _text(body)
        got, _, headers = await http(base + "/runs?token=wrong")
        assert got == 401
        got, _, headers = await http(base + f"/runs?token={secret}&status=failed")
        assert got == 303 and headers["location"] == "/runs?status=failed"
        cookie = headers["set-cookie"].split(";")[0]
        assert secret not in cookie
        got, body, _ = await http(base + "/runs", headers={"Cookie": cookie})
        assert got == 200 and "Runs" in body
        got, _, _ = await http(base + "/runs", headers={"Authorization": f"Bearer {secret}"})
        assert got == 200
        # a token that is not ASCII: refused like any wrong one (compare_digest takes no
        # non-ASCII str: this was a 500)
        for wrong in ("/runs?token=%C3%A9", "/runs"):
            got, _, _ = await http(base + wrong, headers={"Authorization": "Bearer \u00e9"})
            assert got == 401
    finally:
        stop(proc, 15)
    assert secret not in log.read_text()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the README's screenshots go: a pytest temp dir, so `make test` leaves the
    checkout clean; docs/ only when asked (`make screenshots` sets NATFLOW_SCREENSHOTS=1)."""
    if os.environ.get("NATFLOW_SCREENSHOTS") == "1":
        return ROOT / "docs"
    return tmp_path


async def _settled(client: Client, expected: dict[str, str]) -> bool:
    for run_id, status in expected.items():
        if (await client.describe(run_id)).status != status:
            return False
    listed = {r.run_id: r.status for r in await client.list(limit=100)}
    return all(listed.get(run_id) == status for run_id, status in expected.items())


async def test_screenshots_and_phone_layout(
    console: str, client: Client, page: Any, tmp_path: Path
) -> None:
    """Takes console-runs.png and console-run-failed.png (in a temp dir; in docs/, shown in
    the README, with `make screenshots`), and checks both pages fit a phone's width without
    sideways scrolling."""
    shots = screenshot_dir(tmp_path)
    expected: dict[str, str] = {}
    for name in ("ana", "bo", "chen", "dara", "emil"):
        await client.start(greet, {"name": name}, run_id=f"greet-{name}")
        expected[f"greet-{name}"] = "completed"
    for order in ("order-1041", "order-1043"):
        await client.start(approval, {"order": order}, run_id=f"approve-{order}")
        expected[f"approve-{order}"] = "waiting"
    await client.start(checkout, {"order": "order-1042", "total": 129.9}, run_id="checkout-1042")
    expected["checkout-1042"] = "failed"
    await client.start(approval, {"order": "order-1039"}, run_id="approve-order-1039")
    expected["approve-order-1039"] = "waiting"
    await client.start(pipeline, {"stages": 4}, run_id="nightly-export")
    GATES["nightly-export", 1].set()
    expected["nightly-export"] = "running"
    await wait_for(lambda: _settled(client, expected), timeout=30, what="the runs to settle")
    await client.cancel("approve-order-1039", reason="order withdrawn")
    expected["approve-order-1039"] = "cancelled"
    await wait_for(lambda: _settled(client, expected), timeout=30, what="the cancellation")

    await page.set_viewport_size({"width": 1280, "height": 820})
    await page.goto(f"{console}/runs")
    await page.locator('.count[data-status="completed"] b:text-is("5")').wait_for()
    await page.locator('.count[data-status="failed"] b:text-is("1")').wait_for()
    shots.mkdir(exist_ok=True)
    await page.screenshot(path=str(shots / "console-runs.png"))
    await page.goto(f"{console}/runs/checkout-1042")
    await page.locator('#steps tr.step[data-step="charge-card"][data-status="failed"]').wait_for()
    assert "CardDeclined" in await page.inner_text("#outcome")
    assert "Traceback" in await page.inner_text("#outcome")
    assert await page.locator("#timeline .tl-bar.k-sleep.b-completed").count() == 1
    assert "2 tries" in await page.inner_text("#timeline")
    await page.screenshot(path=str(shots / "console-run-failed.png"), full_page=True)
    assert (shots / "console-runs.png").stat().st_size > 10_000

    await page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/runs", "/runs/checkout-1042", "/workers", "/start"):
        await page.goto(console + path)
        overflow = await page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, f"{path} scrolls sideways on a phone by {overflow}px"
    for stage in range(1, 5):
        GATES["nightly-export", stage].set()


async def test_times_carry_their_zone_and_switch_to_local(console: str, page: Any) -> None:
    """Times show in UTC with the zone named; the header's button shows the browser's zone."""
    await page.goto(f"{console}/workers")
    first = page.locator("#workers-table time").first
    await first.wait_for()
    assert await first.locator(".zone").inner_text() == "UTC"
    utc_clock = await first.locator(".abs").inner_text()
    await page.click("[data-zone-toggle]")
    assert await page.inner_text("[data-zone-toggle]") == "Times: local"
    zone = await first.locator(".zone").inner_text()
    assert zone in ("CET", "CEST", "GMT+1", "GMT+2"), zone  # the browser runs in Europe/Berlin
    local_hour = int((await first.locator(".abs").inner_text())[:2])
    assert (local_hour - int(utc_clock[:2])) % 24 in (1, 2)
    await page.click("[data-zone-toggle]")  # back to UTC for the other tests
    assert await first.locator(".zone").inner_text() == "UTC"


async def test_runs_page_shows_new_runs_live(console: str, client: Client, page: Any) -> None:
    await page.goto(f"{console}/runs")
    await page.evaluate("window.__sameDocument = true")
    await client.start(greet, {"name": "live"}, run_id="greet-arrives-live")
    row = page.locator('tr.run-row[data-run="greet-arrives-live"]')
    await row.locator(".badge.s-completed").wait_for()
    assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"
    assert await page.locator('.count[data-status="completed"] b').inner_text() != "0"


async def test_terminate_relations_and_dead_letters(console: str, client: Client) -> None:
    """Terminate from the run page's form; a child run links to its parent and back; a
    signal nobody can take shows on the dead letters page with its reason."""
    parent = await client.start(approval, {"order": "P-1"}, run_id="parent-run")
    await wait_for(lambda: _is(client, parent.run_id, "waiting"), what="the parent to wait")
    await Runs(client.connection).start("greet", "console", b'{"name": "kid"}', "child-run",
                                        parent="parent-run")  # fmt: skip
    await client.handle("child-run").result(timeout=10)

    async def listed() -> bool:
        return 'href="/runs/child-run"' in (await http(f"{console}/runs/parent-run"))[1]

    await wait_for(listed, what="the parent's page to list its child")
    assert 'href="/runs/parent-run"' in (await http(f"{console}/runs/child-run"))[1]

    status, _, headers = await http(f"{console}/runs/parent-run/action/terminate", {"reason": "x"})
    assert status == 303 and "Terminate" in headers["location"]
    await wait_for(lambda: _is(client, "parent-run", "terminated"), what="the termination")
    status, body, _ = await http(f"{console}/runs/parent-run/action/cancel", {})
    assert status == 400 and "does not apply" in _text(body)

    await client.connection.publish("natflow.signal.nobody-home.approved", b"{}", {})

    async def dead_lettered() -> bool:
        return "no run has this id" in (await http(f"{console}/dead-letters"))[1]

    await wait_for(dead_lettered, what="the dead letter")


async def test_natflow_dev_serves_the_console(tmp_path: Path) -> None:
    """`natflow dev` starts the server, the engine and the console (--ui-port); Ctrl-C stops
    all three."""
    nats_port, ui_port = free_port(), free_port()
    log = tmp_path / "dev.log"
    proc = _dev(tmp_path, nats_port, ui_port, log)
    try:

        async def serving() -> bool:
            return "natflow console at" in log.read_text()

        await wait_for(serving, timeout=30, what="natflow dev to serve the console")
        status, body, _ = await http(f"http://127.0.0.1:{ui_port}/runs")
        assert status == 200 and f"nats://127.0.0.1:{nats_port}" in body
    finally:
        stop(proc, 2)  # SIGINT, as Ctrl-C
    assert proc.returncode == 130, log.read_text()  # README: 130 after Ctrl-C


def _dev(tmp_path: Path, nats_port: int, ui_port: int, log: Path) -> subprocess.Popen[bytes]:
    """`natflow dev` on its own configuration (NATS on ``nats_port``), the console on
    ``ui_port``, its output to ``log``."""
    config = tmp_path / "nats.conf"
    config.write_text(
        f'listen: 127.0.0.1:{nats_port}\njetstream {{ store_dir: "{tmp_path}/js" }}\n'
    )
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "natflow_engine", "dev", "--config", str(config),
             "--metrics-port", "0", "--ui-port", str(ui_port)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


async def test_natflow_dev_with_the_console_port_taken_says_to_pick_another_ui_port(
    tmp_path: Path,
) -> None:
    """The warning said "pick another with --port", which under dev is the NATS port, and
    uvicorn's own "ERROR: [Errno 98] ..." line came beside it."""
    log = tmp_path / "dev.log"
    with taken_port() as ui_port:
        proc = _dev(tmp_path, free_port(), ui_port, log)
        try:

            async def warned() -> bool:
                return "no console" in log.read_text()

            await wait_for(warned, timeout=30, what="natflow dev to report the console")
        finally:
            stop(proc, 2)
    text = log.read_text()
    assert (
        f"natflow dev: no console: the console could not listen on 127.0.0.1:{ui_port} "
        "(Address already in use); pick another with --ui-port\n"
    ) in text
    assert "Errno" not in text and "ERROR" not in text, text


async def test_natflow_ui_with_its_port_taken_says_to_pick_another_port(
    nats_server: EmbeddedServer,
) -> None:
    with taken_port() as port:
        done = await anyio.run_process(
            [sys.executable, "-m", "natflow_engine", "--url", nats_server.url, "ui",
             "--port", str(port)],
            cwd=ROOT, check=False,
        )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"natflow ui: the console could not listen on 127.0.0.1:{port} "
        "(Address already in use); pick another with --port\n"
    )


async def test_pause_resume_and_restart_from_the_run_page(console: str, client: Client) -> None:
    """The run operations of issue 13 are buttons of the run page: pause a waiting run,
    resume it, and restart a closed one (the page then shows the new run)."""
    run = await client.start(approval, {"order": "P-2"}, run_id="pause-me")
    await wait_for(lambda: _is(client, run.run_id, "waiting"), what="the run to wait")
    assert "/action/pause" in (await http(f"{console}/runs/pause-me"))[1]
    status, _, headers = await http(f"{console}/runs/pause-me/action/pause", {"reason": "x"})
    assert status == 303 and "Pause" in headers["location"]
    await wait_for(lambda: _is(client, run.run_id, "paused"), what="the pause")
    body = (await http(f"{console}/runs/pause-me"))[1]
    assert "/action/resume" in body and "/action/pause" not in body
    status, _, _ = await http(f"{console}/runs/pause-me/action/resume", {})
    assert status == 303
    await wait_for(lambda: _is(client, run.run_id, "waiting"), what="the resume")
    await client.terminate(run.run_id, "done here")
    await wait_for(lambda: _is(client, run.run_id, "terminated"), what="the termination")
    form = {"from_step": "prepare#1"}
    status, body, headers = await http(f"{console}/runs/pause-me/action/restart", form)
    assert status == 303  # restarted: the page of the new run
    assert headers["location"].startswith("/runs/pause-me-r1")
    assert (await http(console + "/runs/pause-me-r1"))[0] == 200


async def test_restart_is_offered_where_it_can_work_and_a_refusal_is_explained(
    console: str, client: Client
) -> None:
    """Restart was offered on every closed run, and on one with no failed step it always
    failed, as a 502 "natflow could not do that". Now it is offered on runs that recorded
    a step, with a choice of step (the first failed one, else the first, preselected); a
    restart the run cannot take comes back as the run page with the reason, a 400."""
    await (await client.start(greet, {"name": "Ada"}, run_id="greeted")).result(timeout=20)
    body = (await http(f"{console}/runs/greeted"))[1]
    assert "/runs/greeted/action/restart" in body
    assert '<option value="greet#1" selected>greet#1</option>' in body
    status, body, _ = await http(f"{console}/runs/greeted/action/restart", {})  # no step
    assert status == 400 and "no failed step to restart from" in _text(body)
    assert 'id="run-status" data-status="completed"' in body  # the run's own page
    status, body, _ = await http(f"{console}/runs/greeted/action/restart", {"from_step": "x#1"})
    assert status == 400 and "recorded no step x#1; its steps: greet#1" in _text(body)
    status, _, headers = await http(
        f"{console}/runs/greeted/action/restart", {"from_step": "greet#1"}
    )
    assert status == 303 and headers["location"].startswith("/runs/greeted-r1")

    await (await client.start(pipeline, {"stages": 0}, run_id="stepless")).result(timeout=20)
    body = (await http(f"{console}/runs/stepless"))[1]
    assert "/action/restart" not in body  # nothing recorded to restart from: no button
    status, body, _ = await http(f"{console}/runs/stepless/action/restart", {})
    assert status == 400 and "recorded no step: 'Restart' has none" in _text(body)


def test_two_consoles_on_one_host_keep_their_own_login() -> None:
    """Browsers keep cookies per host, not per port: two consoles with their own tokens
    (two tenants' on one host) shared one cookie name, and a login to one logged the other
    out."""
    from natflow_engine.console._app import Guard

    shop, bank = Guard(None, "shop-token"), Guard(None, "bank-token")  # type: ignore[arg-type]
    assert shop.cookie_name != bank.cookie_name
    assert shop.cookie_name == Guard(None, "shop-token").cookie_name  # type: ignore[arg-type]
    assert "shop-token" not in shop.cookie_name
