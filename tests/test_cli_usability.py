"""The `natflow` command line as people expect of `temporal` and `nats` (issue 9): help on
everything, one clear line for every usage mistake, quiet pipes, input from files and stdin,
warnings about runs nobody serves, validation against announced schemas, Ctrl-C that says
the run goes on. Real processes against a real server."""

from __future__ import annotations

import argparse
import json
import os
import pty
import signal
import subprocess
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
import pytest
from natflow import Client, InvalidInput, WorkflowContext, workflow
from natflow_engine._cli import build_parser
from natflow_engine._engine import Engine
from natflow_engine._history import HistoryStore
from natflow_engine._input_schema import announced, check_input
from natflow_engine._registry import WorkerInfo
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import ensure_streams
from natflow_engine.events import RunClaimed, RunStarted, utcnow

from examples.workflows import WORKFLOWS
from tests.helpers import ROOT, running_worker, wait_for
from tests.links import free_port
from tests.test_cli import NATFLOW, assert_one_clear_error, err_lines, natflow, out
from tests.test_wheel import write_user_project


def test_every_command_has_a_description_and_every_option_says_what_it_takes() -> None:
    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        if not parser.description:
            missing.append(f"{parser.prog}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)
            elif action.dest != "help" and not action.help:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
        text = parser.format_help()
        for action in parser._actions:
            shown = action.option_strings and not action.dest.endswith(("password", "token"))
            if shown and action.default not in (None, False, argparse.SUPPRESS):
                assert f"{action.default}" in text, (parser.prog, action.dest)

    walk(build_parser())
    assert missing == []


def test_secrets_from_the_environment_never_show_in_help() -> None:
    env = {
        **os.environ,
        "NATFLOW_PASSWORD": "hunter2-secret",
        "NATFLOW_TOKEN": "tok-secret",
        "NATFLOW_UI_TOKEN": "ui-secret",
    }
    for command in ((), ("dev",), ("ui",)):
        done = subprocess.run(
            [*NATFLOW, *command, "--help"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        assert "secret" not in done.stdout, done.stdout


async def test_usage_mistakes_are_one_line_naming_the_problem() -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # none of these gets as far as connecting
    for args, needles in (
        (("--log-level", "loud", "runs", "list"), ("--log-level", "'loud'", "debug")),
        (("runs", "list", "--limit", "0"), ("--limit", "below 1")),
        (("runs", "list", "--status", "bogus"), ("'bogus'", "pending")),
        (("worker", "no_such_module_here"), ("no module named 'no_such_module_here'",)),
        (("worker", "missing/app.py"), ("no file missing/app.py",)),
        (("start", "greet", "--input", "@/no/such/file.json"), ("cannot read /no/such/file.json",)),
        (("--creds", "/no/such.creds", "runs", "list"), ("--creds /no/such.creds: no such file",)),
        (("--tls-ca", "/no/ca.pem", "workers"), ("--tls-ca /no/ca.pem: no such file",)),
    ):
        proc = await natflow(url, *args)
        assert_one_clear_error(proc, *needles)


async def test_runs_list_says_how_many_it_left_out_and_a_closed_pipe_ends_quietly(
    client: Client, engine: Engine
) -> None:
    await ensure_streams(client.connection)
    async with anyio.create_task_group() as tg:
        for n in range(150):
            tg.start_soon(partial(client.start, "unserved", run_id=f"many-{n}"))

    async def indexed() -> bool:
        return len(await client.list(limit=1000)) == 150

    await wait_for(indexed, what="150 runs in the index")
    url = client.connection.url
    few = await natflow(url, "runs", "list", "--limit", "5")
    assert few.returncode == 0
    assert len(out(few).splitlines()) == 6  # a header and 5 rows
    assert err_lines(few) == ["5 of 150; --limit N shows more"]
    header, row = out(few).splitlines()[:2]
    assert header.index("STATUS") == row.index("pending")  # aligned columns
    assert " UTC" in row

    # ~100 KiB of JSON into a reader that stops after one line: no BrokenPipeError, exit 0.
    env = {**os.environ, "NATFLOW_URL": url}
    shell = f"{' '.join(NATFLOW)} runs list --json --limit 150 | head -n 1; exit ${{PIPESTATUS[0]}}"
    with anyio.fail_after(30):
        piped = await anyio.run_process(["bash", "-c", shell], env=env, check=False)
    assert piped.returncode == 0, piped.stderr.decode()
    assert piped.stdout.decode() == "[\n"
    assert piped.stderr.decode() == ""


async def test_input_from_a_file_and_from_stdin(client: Client, tmp_path: Path) -> None:
    await ensure_streams(client.connection)
    url = client.connection.url
    data = tmp_path / "input.json"
    data.write_text('{"from": "file", "n": [1, 2]}')
    from_file = await natflow(url, "start", "unserved", "--input", f"@{data}", "--run-id", "in-1")
    assert from_file.returncode == 0, from_file.stderr.decode()
    env = {**os.environ, "NATFLOW_URL": url}
    with anyio.fail_after(30):
        from_stdin = await anyio.run_process(
            [*NATFLOW, "start", "unserved", "--input", "-", "--run-id", "in-2"],
            input=b'{"from": "stdin"}',
            env=env,
            check=False,
        )
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    # No engine runs here, so nothing indexed the runs: the empty list says where it comes from.
    empty = await natflow(url, "runs", "list")
    assert out(empty).startswith("no runs (the list is the engine's run index")
    for run_id, expected in (("in-1", {"from": "file", "n": [1, 2]}), ("in-2", {"from": "stdin"})):
        first = (await client.history(run_id))[0]
        assert isinstance(first, RunStarted) and json.loads(bytes(first.input)) == expected


async def test_start_warns_when_nobody_serves_and_checks_input_against_the_workers_schema(
    client: Client, engine: Engine
) -> None:
    url = client.connection.url
    await ensure_streams(client.connection)
    lonely = await natflow(url, "start", "nosuchflow", "--run-id", "lonely-cli")
    assert lonely.returncode == 0
    assert out(lonely).startswith("started: lonely-cli")
    [warning] = err_lines(lonely)
    assert "warning: no live worker serves workflow 'nosuchflow' on queue 'default'" in warning
    assert "natflow worker" in warning
    show = await natflow(url, "runs", "show", "lonely-cli")
    assert "waiting   no live worker serves workflow 'nosuchflow' on queue 'default'" in out(show)
    shown = json.loads(out(await natflow(url, "runs", "show", "lonely-cli", "--json")))
    assert "nosuchflow" in shown["unserved"]
    # Claimed by a worker that is gone since (its lease lapsed), which nobody replaced (a
    # rolling deploy that dropped the workflow): "running" with no word of why it stays so.
    history = HistoryStore(client.connection)
    last = await history.last("lonely-cli")
    assert last is not None
    claim = RunClaimed(id="lonely-cli:2", at=utcnow(), worker="gone-worker")
    await history.append("lonely-cli", claim, last[1])
    show = await natflow(url, "runs", "show", "lonely-cli")
    assert "status    running" in out(show), out(show)
    assert "waiting   no live worker serves workflow 'nosuchflow' on queue 'default'" in out(show)

    async with running_worker(client, WORKFLOWS):
        served = await natflow(url, "start", "greet", "--input", '{"name": "Ada"}')
        assert served.returncode == 0 and err_lines(served) == [], served.stderr.decode()
        # Input that does not fit the workflow's annotation: refused before anything is written.
        bad = '{"order_id": "A-9", "user_id": "seven", "total": 1.0, "email": "a@b.c"}'
        refused = await natflow(url, "start", "order", "--input", bad, "--run-id", "bad-order")
        assert_one_clear_error(refused, "'order'", "$.user_id", "'seven'", "integer")
        missing = await natflow(url, "start", "order", "--input", '{"order_id": "A-9"}')
        assert_one_clear_error(missing, "'user_id' is a required property")
        no_input = await natflow(url, "start", "order")
        assert_one_clear_error(no_input, "workflow 'order' takes an input: pass --input JSON")
        wrong_queue = await natflow(url, "start", "greet", "--queue", "elsewhere", "--run-id", "q1")
        assert "serve it on queue default (pass --queue)" in wrong_queue.stderr.decode()
        # The client by name, as the CLI: refused before anything is written (API.md), not a
        # run that fails once a worker decodes its input.
        with pytest.raises(
            InvalidInput, match=r"input does not fit workflow 'order': at \$\.user_id"
        ):
            await client.start("order", json.loads(bad), run_id="bad-order")
        with pytest.raises(InvalidInput, match="workflow 'order' takes an input"):
            await client.start("order", run_id="bad-order")
    assert "bad-order" not in {r.run_id for r in await client.list(limit=100)}


@workflow(name="on_q1", queue="q1")
async def on_q1(ctx: WorkflowContext) -> str:
    return "q1"


@workflow(name="on_q2", queue="q2")
async def on_q2(ctx: WorkflowContext) -> str:
    return "q2"


async def test_start_on_a_queue_that_serves_other_workflows_warns_with_the_right_queue(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """The registry listed a worker's queues and workflows apart, so each workflow counted as
    served on each queue: on_q1 on q2 started without a word and waited for good, and the
    hint named q1 and q2."""
    async with running_worker(client, [on_q1, on_q2]):
        wrong = await natflow(nats_server.url, "start", "on_q1", "--queue", "q2")
        warning = wrong.stderr.decode()
        assert "no live worker serves workflow 'on_q1' on queue 'q2'" in warning, warning
        assert "serve it on queue q1 (pass --queue)" in warning, warning
        right = await natflow(nats_server.url, "start", "on_q2", "--queue", "q2")
        assert right.returncode == 0 and err_lines(right) == [], right.stderr.decode()


async def test_dev_on_a_port_in_use_names_it_and_how_to_pick_another(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    for args, port, option in (
        (("--port", str(nats_server.port), "--http-port", "0"), nats_server.port, "--port"),
        (("--port", "0", "--http-port", str(nats_server.port)), nats_server.port, "--http-port"),
    ):
        proc = await natflow(
            nats_server.url, "dev", *args, "--metrics-port", "0", "--store-dir", str(tmp_path)
        )
        assert_one_clear_error(proc, f"port {port} is in use", f"{option} N")


async def test_credentials_the_server_refuses_are_named_and_the_password_never_shown(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f'listen: 127.0.0.1:-1\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization { user: ada, password: right-one }\n"
    )
    server = EmbeddedServer(conf, store_dir=tmp_path / "logs")
    server.start()
    try:
        for url, args in (
            (f"nats://ada:wrong-pw-1@127.0.0.1:{server.port}", ()),
            (server.url, ("--user", "ada", "--password", "wrong-pw-2")),
        ):
            proc = await natflow(url, *args, "runs", "list")
            line = assert_one_clear_error(proc, "refused the credentials", "NATFLOW_PASSWORD")
            assert "wrong-pw" not in line
    finally:
        server.stop()


def test_start_wait_on_a_terminal_shows_progress_and_ctrl_c_says_the_run_goes_on(
    nats_server: EmbeddedServer,
) -> None:
    controller, terminal = pty.openpty()
    env = {**os.environ, "NATFLOW_URL": nats_server.url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*NATFLOW, "start", "nobody-runs-me", "--run-id", "tty-1", "--wait"],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
        start_new_session=True,
    )
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"pending: no live worker serves workflow 'nobody-runs-me'" not in seen:
            assert time.monotonic() < deadline and proc.poll() is None, seen.decode()
            seen += os.read(controller, 4096)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 130
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the process closed its end
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    text = seen.decode()
    assert "stopped waiting; run tty-1 goes on" in text, text
    assert "natflow runs wait tty-1" in text and "Traceback" not in text
    assert proc.stdout is not None and proc.stdout.read().decode().startswith("started: tty-1")


async def test_a_project_with_its_own_engine_and_sdk_runs_under_natflow_worker(
    client: Client, tmp_path: Path
) -> None:
    """The user's ``engine.py`` and ``sdk/`` are theirs: natflow installs neither name."""
    app = write_user_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NATFLOW_URL"] = client.connection.url
    for target, cwd in ((str(app), tmp_path), ("app:hello", app.parent)):
        proc = subprocess.Popen(  # noqa: ASYNC220 - a process that runs beside the test
            [*NATFLOW, "worker", target, "--metrics-port", "0", "--processes", "1"],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            handle = await client.start("hello", {"name": target}, run_id=f"own-{cwd.name}")
            assert await handle.result(timeout=30) == f"Hello, {target}!"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read().decode()


async def test_a_second_dev_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """nats-server would run two servers on one store's files; natflow dev refuses."""
    args = ["dev", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--ui-port", "0"]
    args += ["--store-dir", str(tmp_path / "store")]
    log = tmp_path / "first.log"
    with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
        first = subprocess.Popen(  # noqa: ASYNC220 - a process that runs beside the test
            [*NATFLOW, *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        async def running() -> bool:
            return "engine running" in log.read_text()

        await wait_for(running, timeout=30, what="the first natflow dev")
        second = await natflow("nats://127.0.0.1:1", *args)
        assert_one_clear_error(second, "already uses the store", "--store-dir DIR")
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=30)


def _worker_serving(identity: str, schema: object) -> WorkerInfo:
    now = datetime.now(UTC)
    return WorkerInfo(
        identity=identity,
        host="h",
        pid=1,
        queues=["default"],
        workflows=["shared"],
        started_at=now,
        heartbeat_at=now,
        lease_ttl=15.0,
        input_schemas={"shared": schema},
    )


def test_input_that_fits_any_live_workers_schema_is_taken_during_a_rolling_deploy() -> None:
    """The first worker listed decided alone: input the other (older) workers take was
    refused, and input only the first takes passed and failed on the others."""
    old = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    new = {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}
    workers = [_worker_serving("a-new", new), _worker_serving("z-old", old)]
    schema = announced(workers, "shared")
    check_input("shared", b'{"a": 1}', schema)
    check_input("shared", b'{"b": "x"}', schema)
    with pytest.raises(InvalidInput, match="its workers announce 2 input types; it fits none"):
        check_input("shared", b'{"c": 1}', schema)
    assert announced(workers[:1], "shared") == new  # one schema: itself, as before
