"""The wheel as a user installs it: built from the sources, installed into a fresh venv, used
from an empty folder against the server its own `natflow dev` starts (issue 9).

Slow (a venv and a dependency install from the pip cache or PyPI): marked ``slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.links import free_port

APP = """
import engine  # the user's own module of that name, not natflow's
from sdk import greeting  # the user's own package of that name

from natflow import WorkflowContext, workflow


@workflow
async def hello(ctx: WorkflowContext, input: dict) -> str:
    return await ctx.step("greet", greeting, engine.PREFIX, input["name"])
"""
USER_ENGINE = 'PREFIX = "Hello"\n'
USER_SDK = "def greeting(prefix: str, name: str) -> str:\n    return f'{prefix}, {name}!'\n"


def write_user_project(folder: Path) -> Path:
    """``app.py`` beside the user's own ``engine.py`` and ``sdk/`` package."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(APP)
    (folder / "engine.py").write_text(USER_ENGINE)
    (folder / "sdk").mkdir(exist_ok=True)
    (folder / "sdk" / "__init__.py").write_text(USER_SDK)
    return folder / "app.py"


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with only the built wheel (and its dependencies) installed."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".natflow", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # --no-isolation: setuptools comes from the dev venv, so building needs no download.
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp)],
        source,
        env,
    )
    [wheel] = tmp.glob("natflow-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp, env)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], tmp, env)
    yield venv / "bin"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_alone_runs_dev_worker_start_and_runs_from_an_empty_folder(
    installed: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    env.pop("NATFLOW_URL", None)
    python, natflow = str(installed / "python"), str(installed / "natflow")

    # nkeys too: nats-py needs it for a credentials file (--creds).
    run([python, "-c", "import natflow, natflow.events, natflow_engine, nkeys"], empty, env)
    for name in ("sdk", "engine"):
        done = subprocess.run([python, "-c", f"import {name}"], cwd=empty, env=env, check=False)
        assert done.returncode != 0, f"`import {name}` works: the wheel installs a top-level {name}"
    assert run([natflow, "--version"], empty, env).strip() == "natflow 0.1.0"

    ui_port = free_port()
    dev_command = [natflow, "dev", "--port", "0", "--http-port", "0", "--metrics-port", "0"]
    dev_command += ["--ui-port", str(ui_port)]
    dev_log = tmp_path / "dev.log"
    with open(dev_log, "w") as out:
        dev = subprocess.Popen(
            dev_command,
            cwd=empty,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = None
    try:
        deadline = time.monotonic() + 60
        while "natflow console at" not in dev_log.read_text():
            assert dev.poll() is None, dev_log.read_text()
            assert time.monotonic() < deadline, dev_log.read_text()
            time.sleep(0.1)
        text = dev_log.read_text()
        url = re.search(r"nats-server at (nats://\S+)", text)
        assert url, text
        assert "natflow's default" in text  # no file at hand: the packaged configuration
        assert f"{empty / '.natflow' / 'jetstream'}" in text  # the store, printed
        env["NATFLOW_URL"] = url.group(1)
        # The console's templates and static files are in the wheel too.
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()

        project = write_user_project(tmp_path / "project")
        worker_log = tmp_path / "worker.log"
        with open(worker_log, "w") as out:
            worker = subprocess.Popen(
                [natflow, "worker", str(project), "--metrics-port", "0"],
                cwd=empty,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while "serving queues" not in worker_log.read_text():
            assert worker.poll() is None, worker_log.read_text()
            assert time.monotonic() < deadline, worker_log.read_text()
            time.sleep(0.1)
        # uvloop came with the wheel's dependencies, and the command runs on it
        assert "event loop uvloop)" in worker_log.read_text()

        started = run(
            [natflow, "start", "hello", "--input", '{"name": "Ada"}', "--run-id", "w-1", "--wait"],
            empty,
            env,
            timeout=60,
        )
        assert started.startswith("started: w-1"), started
        assert "status    completed" in started and '"Hello, Ada!"' in started, started

        listed = ""
        while "w-1" not in listed:  # the engine indexes the run a moment after it ends
            assert time.monotonic() < deadline + 30, listed
            listed = run([natflow, "runs", "list"], empty, env, timeout=60)
        assert re.search(r"w-1\s+hello\s+completed", listed), listed
        assert sorted(p.name for p in empty.iterdir()) == [".natflow"]
    finally:
        for proc in (worker, dev):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
