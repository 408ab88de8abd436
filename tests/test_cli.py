"""The `natflow` command line as a user runs it: real processes against a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from natflow import Client, NatflowError, RunFailed, WorkflowContext, workflow
from natflow_engine import PermissionDenied
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine._streams import ensure_streams

from examples.workflows import WORKFLOWS
from tests.helpers import ROOT, running_worker, wait_for
from tests.links import free_port

_SCRIPT = Path(sys.executable).parent / "natflow"
NATFLOW = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "natflow_engine"]


async def natflow(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "NATFLOW_URL": url, "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(30):
        return await anyio.run_process([*NATFLOW, *args], env=env, cwd=ROOT, check=False)


def out(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode()


def err_lines(proc: subprocess.CompletedProcess[bytes]) -> list[str]:
    return proc.stderr.decode().splitlines()


def assert_one_clear_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback; returns that line."""
    lines = err_lines(proc)
    assert proc.returncode != 0, (proc.returncode, out(proc), lines)
    assert len(lines) == 1, lines
    assert "Traceback" not in proc.stderr.decode()
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


async def test_start_wait_and_inspect_a_run(client: Client, nats_server: EmbeddedServer) -> None:
    url = nats_server.url
    engine = Engine(client.connection)
    async with anyio.create_task_group() as tg, running_worker(client, WORKFLOWS):
        tg.start_soon(engine.run)
        started = await natflow(
            url, "start", "greet", "--input", '{"name": "Ada"}', "--run-id", "cli-1", "--wait"
        )
        assert started.returncode == 0, started.stderr.decode()
        first, _, rest = out(started).partition("\n")
        assert first == "started: cli-1"
        assert "status    completed" in rest
        assert 'result    {"greeting":"Hello, Ada!"}' in rest

        # The run id is an idempotency key: a second start shows the same run, and says the
        # input given now was not used.
        again = await natflow(
            url, "start", "greet", "--input", '{"name": "Bob"}', "--run-id", "cli-1", "--wait"
        )
        assert again.returncode == 0
        lines = out(again).splitlines()
        assert lines[0] == "exists: cli-1 (started before; nothing new started)"
        assert "the --input given now was not used" in lines[1]
        waited = await natflow(
            url,
            "start",
            "greet",
            "--input",
            '{"name": "Ada"}',
            "--run-id",
            "cli-1",
            "--wait",
            "--json",
        )
        assert waited.returncode == 0
        shown = json.loads(out(waited))["run"]
        assert shown["run_id"] == "cli-1" and shown["status"] == "completed"
        assert shown["result"] == {"greeting": "Hello, Ada!"}

        # Without --wait: prints the id at once (a generated one when none is given).
        quick = await natflow(url, "start", "greet", "--input", '{"name": "Cy"}')
        assert quick.returncode == 0
        generated = out(quick).strip().removeprefix("started: ")
        assert generated and generated != out(quick).strip()
        assert await client.handle(generated).result(timeout=10) == {"greeting": "Hello, Cy!"}

        async def indexed() -> bool:
            runs = await client.list(status="completed")
            return {"cli-1", generated} <= {r.run_id for r in runs}

        await wait_for(indexed, what="both runs in the engine's index")

        listed = await natflow(url, "runs", "list")
        assert listed.returncode == 0, listed.stderr.decode()
        rows = {line.split()[0]: line.split() for line in out(listed).splitlines()[1:]}
        assert rows["cli-1"][1:3] == ["greet", "completed"]
        assert generated in rows

        listed_json = await natflow(url, "runs", "list", "--json", "--workflow", "greet")
        assert listed_json.returncode == 0
        assert {r["run_id"] for r in json.loads(out(listed_json))} == {"cli-1", generated}

        show = await natflow(url, "runs", "show", "cli-1")
        assert show.returncode == 0, show.stderr.decode()
        text = out(show)
        assert "run       cli-1" in text
        assert "status    completed" in text
        assert 'result    {"greeting":"Hello, Ada!"}' in text
        assert "created   20" in text and " UTC" in text
        step = next(line for line in text.splitlines() if line.startswith("hello "))
        assert step.split()[:4] == ["hello", "1", "completed", "1"] and '"Hello, Ada!"' in step

        show_json = await natflow(url, "runs", "show", "cli-1", "--json")
        assert show_json.returncode == 0
        detail = json.loads(out(show_json))
        assert detail["run"]["status"] == "completed"
        assert [(s["name"], s["status"]) for s in detail["steps"]] == [("hello", "completed")]

        history = await natflow(url, "runs", "history", "cli-1")
        assert history.returncode == 0, history.stderr.decode()
        kinds = [line.split()[4] for line in out(history).splitlines()[1:]]
        assert kinds == ["run_started", "run_claimed", "step_completed", "run_completed"]
        history = await natflow(url, "runs", "history", "cli-1", "--json")
        events = json.loads(out(history))
        assert [e["type"] for e in events] == [
            "run_started",
            "run_claimed",
            "step_completed",
            "run_completed",
        ]
        assert events[-1]["result"] == {"greeting": "Hello, Ada!"}
        tg.cancel_scope.cancel()


async def test_bad_run_ids_and_input_give_one_clear_error(
    client: Client, nats_server: EmbeddedServer
) -> None:
    url = nats_server.url
    await ensure_streams(client.connection)  # so no "created stream" line joins the error

    for args in (
        ("runs", "show", "bad.id"),
        ("runs", "history", "a b"),
        ("runs", "show", "x" * 129),
        ("start", "greet", "--run-id", "no*wildcards"),
    ):
        proc = await natflow(url, *args)
        assert_one_clear_error(proc, "invalid run_id")

    proc = await natflow(url, "runs", "show", "no-such-run")
    assert_one_clear_error(proc, "natflow runs:", "'no-such-run'")
    # Waited for under the Ctrl-C watch (a task group): the same one line, not a traceback.
    proc = await natflow(url, "runs", "wait", "no-such-run")
    assert_one_clear_error(proc, "natflow runs:", "'no-such-run'")

    proc = await natflow(url, "start", "greet", "--input", "{not json")
    assert_one_clear_error(proc, "natflow start:", "--input is not valid JSON")


async def test_every_command_without_a_server_says_how_to_start_one() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    commands = [
        ("start", "greet", "--input", '{"name": "Ada"}'),
        ("runs", "list"),
        ("runs", "show", "some-run"),
        ("runs", "history", "some-run"),
        ("init",),
    ]
    results: dict[tuple[str, ...], subprocess.CompletedProcess[bytes]] = {}

    async def run(args: tuple[str, ...]) -> None:
        results[args] = await natflow(url, *args)

    async with anyio.create_task_group() as tg:
        for args in commands:
            tg.start_soon(run, args)
    for args in commands:
        line = assert_one_clear_error(results[args], "natflow dev", url)
        assert line.startswith(f"natflow {args[0]}: "), line
        assert out(results[args]) == ""


async def test_client_connect_fails_within_connect_timeout() -> None:
    """API.md: "Connect fails with NatflowError within connect_timeout when no server answers"."""
    url = f"nats://127.0.0.1:{free_port()}"
    began = time.monotonic()
    with pytest.raises(NatflowError, match="natflow dev"):
        await Client.connect(url, connect_timeout=1.0)
    elapsed = time.monotonic() - began
    assert elapsed <= 1.25, f"connect_timeout=1.0 but failing took {elapsed:.2f} s"


async def test_a_denied_subject_is_a_clear_error_not_a_timeout(tmp_path: Path) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f"""
listen: 127.0.0.1:-1
jetstream {{ store_dir: "{tmp_path / "js"}" }}
accounts {{
  APP {{
    jetstream: enabled
    users: [
      {{ user: app, password: app, permissions: {{
          publish: {{ allow: ["$JS.API.>", "_INBOX.>", "natflow.task.>"] }}
          subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    ]
  }}
}}
"""
    )
    server = EmbeddedServer(conf, store_dir=tmp_path / "logs")
    server.start()
    try:
        client = await Client.connect(server.url, user="app", password="app")
        try:
            with pytest.raises(PermissionDenied, match=r"natflow\.history\.denied-1"):
                await client.start("anything", {"x": 1}, run_id="denied-1")
        finally:
            await client.close()
    finally:
        server.stop()


async def test_hostile_arguments_files_and_closed_stdio_give_one_clear_error(
    client: Client, nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    """Each of these printed a Python traceback, aborted (uvloop, exit 134), printed a
    password, or silently did something else than asked (stop 31's CLI hunt)."""
    url = nats_server.url
    await ensure_streams(client.connection)
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe not text")
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    (tmp_path / "seed").write_text("not a seed\n")
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    not_utf8 = os.fsdecode(b"late \xcc")  # as Python hands over an argument that is not UTF-8
    cases: list[tuple[tuple[str, ...], str]] = [
        (("start", "greet", "--input", f"@{tmp_path / 'bin.dat'}"), "is not UTF-8 text"),
        (("start", "greet", "--input", f"@{tmp_path / 'deep.json'}"), "nests arrays or objects"),
        (("start", "greet", "--input", '"\\ud800"'), "holds text that is not UTF-8"),
        (("start", "greet", "--input", "NaN"), "NaN is not a JSON value"),
        (("events", "emit", "ev", "Infinity"), "Infinity is not a JSON value"),
        (("cancel", "some-run", "--reason", not_utf8), "reason: holds bytes that are not"),
        (("--nkey", str(tmp_path / "seed"), "runs", "list"), "holds no nkey seed"),
        (("--nkey", str(tmp_path / "nothing"), "runs", "list"), "cannot read the nkey seed"),
        (("--tls-ca", str(tmp_path / "ca.pem"), "runs", "list"), "not a PEM file of CA"),
        (("auth", "viewer", "--domain", "*"), "invalid JetStream domain '*'"),
        (("auth", "--all", "--json"), "--json takes one role"),
        (("worker", ":x"), "names no module"),
        (("engine", "--metrics-port", "99999"), "99999 is not a port"),
        (("engine", "--metrics-interval", "0"), "0 is below 0.1 s"),
        (("events", "list", "--limit", "0"), "0 is below 1"),
        (("engine", "--retention", "abc"), "--retention 'abc' is not a duration"),
    ]
    for args, needle in cases:
        assert_one_clear_error(await natflow(url, *args), needle)
    # A password that is not UTF-8 is refused without being shown.
    secret = os.fsdecode(b"s3cret\xcc")
    line = assert_one_clear_error(await natflow(url, "--password", secret, "runs", "list"))
    assert "s3cret" not in line and "password: holds bytes" in line
    # A URL without its scheme (nats-py takes it): its password was printed whole.
    dead = f"alice:s3cret@127.0.0.1:{free_port()}"
    line = assert_one_clear_error(await natflow(dead, "runs", "list"), "alice:***@")
    assert "s3cret" not in line
    # Closed stdin, stdout or stderr: the first socket took its descriptor, uvloop aborted.
    for closed in ("<&-", ">&-", "2>&-"):
        done = await anyio.run_process(
            f"{' '.join(NATFLOW)} init {closed}",
            env={**os.environ, "NATFLOW_URL": url},
            check=False,
        )
        assert done.returncode == 0, (closed, done.returncode, done.stderr.decode()[-500:])


def test_an_engine_is_a_hubs_or_a_sites_not_both() -> None:
    """``--sites`` and ``--site`` together ran both roles, and made the hub a site."""
    done = subprocess.run(
        [*NATFLOW, "--url", "nats://127.0.0.1:1", "engine", "--sites", "berlin", "--site", "b"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "exclude each other" in done.stderr, done.stderr


def _fails_with_escapes() -> None:
    raise ValueError("line two\nFAKE-ROW  1  completed\x1b]0;pwned\x07")


@workflow(name="escapist")
async def escapist(ctx: WorkflowContext) -> None:
    await ctx.step("step\x1b[31mred", _fails_with_escapes)


async def test_runs_show_escapes_control_characters_from_errors_and_names(
    client: Client, engine: Engine
) -> None:
    """An error message (or a step name, a cancel reason) reached the terminal as it was: a
    newline faked a table row, an escape sequence set the terminal's title."""
    async with running_worker(client, [escapist]):
        with pytest.raises(RunFailed):
            await (await client.start(escapist, run_id="escapes")).result(timeout=10)
    shown = await natflow(client.connection.url, "runs", "show", "escapes")
    text = out(shown)
    assert "\x1b" not in text and "\x07" not in text, text
    assert "\\x1b]0;pwned\\x07" in text and "\\nFAKE-ROW" in text
    assert "step\\x1b[31mred" in text
    assert not any(line.startswith("FAKE-ROW") for line in text.splitlines())
