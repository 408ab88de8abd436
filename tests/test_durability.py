"""Durable by default (issue 20): natflow's shipped single-server configurations fsync before
acknowledging; `--fast` relaxes that and says so. Real `natflow server` processes, asked
through the server's own /varz what they do.

The servers the test fixtures start (EmbeddedServer without a configuration) keep
nats-server's default sync: tests exercise crashes of processes, which that survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from natflow import Client
from natflow_engine import HISTORY_STREAM, TASK_STREAM
from natflow_engine._append_batch import SYNC_ALWAYS, SYNC_INTERVAL, appender
from natflow_engine._lifecycle import LIFECYCLE_STREAM
from natflow_engine._streams import RUNS_STREAM, SIGNAL_STREAM, SYNC_MODE_KEY, ensure_streams
from nats.js import api

from tests.helpers import ROOT
from tests.procs import gone, kill_all, with_argument
from tests.test_cli import NATFLOW, assert_one_clear_error, natflow

SINGLE_SERVER_CONFIGS = (
    ROOT / "engine" / "natflow_engine" / "nats.conf",
    ROOT / "ops" / "auth" / "nats.conf",
    ROOT / "ops" / "tls" / "nats.conf",
    ROOT / "ops" / "tenants" / "nats.conf",
)


def _serve(tmp_path: Path, *args: str) -> tuple[dict[str, str], dict[str, object], str | None]:
    """Run `natflow server ARGS` in an empty folder; its startup lines, /varz's jetstream
    config and the sync mode recorded on the history stream."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NATFLOW_CONFIG", None)
    env.pop("NATFLOW_FAST", None)
    args = ("--port", "0", "--http-port", "0", "--store-dir", "store", *args)
    with _serving(args, tmp_path, env) as lines:
        assert "monitoring" in lines, lines
        with urllib.request.urlopen(lines["monitoring"] + "/varz", timeout=10) as response:
            varz = json.load(response)
        url = lines["natflow"].rsplit(" ", 1)[-1]  # "server: nats-server at URL"
        return lines, varz["jetstream"]["config"], asyncio.run(_recorded_sync_mode(url))


@contextlib.contextmanager
def _serving(args: tuple[str, ...], cwd: Path, env: dict[str, str]) -> Iterator[dict[str, str]]:
    """`natflow server ARGS` in ``cwd``, its startup lines by their first word; stopped at the
    end (SIGTERM)."""
    proc = subprocess.Popen(
        [*NATFLOW, "server", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does: no hang if it fails
            key, _, value = line.strip().partition(" ")
            lines[key] = value.strip()
            if line.startswith("Ctrl-C"):
                break
        yield lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


async def _recorded_sync_mode(url: str) -> str | None:
    client = await Client.connect(url)
    try:
        info = await client.connection.jsm.stream_info(HISTORY_STREAM)
        return (info.config.metadata or {}).get(SYNC_MODE_KEY)
    finally:
        await client.close()


def test_natflow_server_fsyncs_before_acknowledging_by_default(tmp_path: Path) -> None:
    lines, config, recorded = _serve(tmp_path)
    assert config["sync_always"] is True
    assert lines["durability"].startswith("fsync before every ack")
    assert recorded == SYNC_ALWAYS  # where workers and clients read it (test_sync_mode)


def test_fast_acknowledges_before_fsync_and_says_so(tmp_path: Path) -> None:
    lines, config, recorded = _serve(tmp_path, "--fast")
    assert config.get("sync_always", False) is False  # omitted when false
    assert "ack before fsync" in lines["durability"]
    assert "relaxed by --fast" in lines["configuration"]
    assert recorded == SYNC_INTERVAL  # so nobody batches history appends for it


async def test_fast_with_a_configuration_of_ones_own_names_what_to_change(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "mine.conf"
    conf.write_text("listen: 127.0.0.1:-1\njetstream {}\n")
    proc = await natflow("nats://127.0.0.1:1", "server", "--config", str(conf), "--fast")
    assert_one_clear_error(proc, "--fast", "remove `sync_interval: always`")


@pytest.mark.parametrize("path", SINGLE_SERVER_CONFIGS, ids=lambda p: p.parent.name)
def test_every_shipped_single_server_configuration_syncs_always(path: Path) -> None:
    text = path.read_text()
    assert "jetstream" in text
    assert "sync_interval: always" in text


async def test_leases_and_the_index_are_acknowledged_before_fsync_and_history_is_not(
    client: Client,
) -> None:
    """Leases are advice (the history's conditional append fences; a lost lease only slows a
    hand-over) and the run index a projection the engine rewrites from history after a power
    cut (test_index_guard), so they skip the per-write fsync; what a run's progress depends
    on and what any NATS client is told (lifecycle events) keep it."""
    await ensure_streams(client.connection)
    jsm = client.connection.jsm
    for unsynced in ("KV_natflow_leases", RUNS_STREAM):
        info = await jsm.stream_info(unsynced)
        assert info.config.persist_mode == api.PersistMode.ASYNC, unsynced
    # Async persistence excludes atomic batches: the index's writes go one by one.
    runs = await jsm.stream_info(RUNS_STREAM)
    assert not runs.config.allow_atomic
    assert not appender(client.connection, RUNS_STREAM).enabled
    durable = (
        HISTORY_STREAM,
        TASK_STREAM,
        SIGNAL_STREAM,
        LIFECYCLE_STREAM,
        "KV_natflow_timers",
    )
    for name in durable:
        info = await jsm.stream_info(name)
        assert info.config.persist_mode in (None, api.PersistMode.DEFAULT), name


def test_a_server_signalled_while_it_starts_leaves_no_nats_server(tmp_path: Path) -> None:
    """SIGTERM to `natflow server` the moment it names its address, before it waits for
    signals: its nats-server (in a session of its own) stops too. It was left running, with
    nobody to stop it (seen in full test runs under load)."""
    store = (tmp_path / "store").resolve()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [*NATFLOW, "server", "--port", "0", "--http-port", "0", "--store-dir", str(store)]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # a log line may come first
            if "nats-server at" in line:
                break
        else:
            raise AssertionError("natflow server exited before naming its address")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        left = gone(with_argument(str(store)), timeout=10)
        assert not left, f"nats-server still running after natflow server exited: {left}"
    finally:
        proc.kill()
        proc.wait()
        kill_all(with_argument(str(store)))


def test_a_configurations_relative_store_is_shown_where_it_is_and_no_folder_is_left(
    tmp_path: Path,
) -> None:
    """nats-server runs in the configuration's folder, so "data" there is conf/data: the
    banner printed "data/jetstream" (read from where the user stood, another folder), and
    the folder natflow made in /tmp for the server's log stayed after every stop."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "tmp").mkdir()
    conf = tmp_path / "conf" / "mine.conf"
    conf.write_text('listen: 127.0.0.1:-1\njetstream { store_dir: "data" }\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("NATFLOW_STORE_DIR", None)
    with _serving(("--config", "conf/mine.conf"), tmp_path, env) as lines:
        pass
    assert lines["data"].startswith(f"{tmp_path / 'conf' / 'data' / 'jetstream'} "), lines
    assert (tmp_path / "conf" / "data" / "jetstream").is_dir()
    assert list((tmp_path / "tmp").iterdir()) == []
