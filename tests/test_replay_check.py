"""``natflow replay-check`` flags a change that old runs cannot replay, and passes a guarded one."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import anyio
from natflow import AesGcmCodec, Client
from natflow.testing import Replayer
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import SignalWaited, encode_event

from tests.helpers import ROOT, running_worker, wait_for
from tests.workflows_versions import incompatible, patched, v1


def replay_check(
    url: str, target: str, *extra: str, keys: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    if keys is not None:
        env["NATFLOW_CODEC_KEYS"] = keys
    return subprocess.run(
        [sys.executable, "-m", "natflow_engine", "replay-check", target, "--server", url, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_replay_check_reports_an_incompatible_change_and_passes_a_patched_one(
    client: Client, nats_server: EmbeddedServer, engine: Engine, tmp_path: Path
) -> None:
    async with running_worker(client, [v1]):
        for n in (1, 2):
            await client.start(v1, "parcel", run_id=f"ship-{n}")

        async def parked() -> bool:
            histories = [await client.history(f"ship-{n}") for n in (1, 2)]
            return all(any(isinstance(e, SignalWaited) for e in h) for h in histories)

        await wait_for(parked, what="both v1 runs waiting for 'ship'")

    async def indexed() -> bool:
        return len(await client.list(workflow="shipment")) == 2

    await wait_for(indexed, what="the run index to hold both runs")

    bad = replay_check(nats_server.url, "tests.workflows_versions:incompatible", "--since", "1h")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert (
        "run ship-1 (shipment): INCOMPATIBLE at position 2: today's code asks for "
        "step 'insure', history recorded signal wait 'ship'"
    ) in bad.stdout
    assert "2 runs of shipment replayed, 2 incompatible" in bad.stdout

    good = replay_check(nats_server.url, "tests.workflows_versions:patched")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "2 runs of shipment replayed, 0 incompatible" in good.stdout

    # The same verdicts from Python, on a history saved as a file.
    saved = tmp_path / "ship-1.jsonl"
    saved.write_bytes(b"".join(encode_event(e) + b"\n" for e in await client.history("ship-1")))
    assert not Replayer([incompatible]).replay_file(saved).ok
    result = Replayer([patched]).replay_file(saved)
    assert result.ok and result.run_id == "ship-1" and not result.finished
    # ... and as `natflow runs history --json` prints it (no command wrote JSONL: what the
    # CLI saved, replay-check refused)
    printed = await anyio.run_process(
        [sys.executable, "-m", "natflow_engine", "--url", nats_server.url,
         "runs", "history", "ship-1", "--json"],
        cwd=ROOT,
    )  # fmt: skip
    (tmp_path / "ship-1.json").write_bytes(printed.stdout)
    assert Replayer([patched]).replay_file(tmp_path / "ship-1.json").ok
    again = replay_check(
        nats_server.url, "tests.workflows_versions:incompatible",
        "--since", "1s", "--history", str(tmp_path / "ship-1.json"),
    )  # fmt: skip
    assert "run ship-1 (shipment): INCOMPATIBLE" in again.stdout, again.stdout + again.stderr

    # An event this version cannot decode (a newer natflow's): a worker holds the run as
    # blocked, so replay-check must not call it compatible (it left the event out).
    await client.connection.publish(
        "natflow.history.ship-2.step", b'{"type":"step_annotated","v":9,"id":"ship-2:9"}'
    )
    newer = replay_check(nats_server.url, "tests.workflows_versions:patched")
    assert newer.returncode == 1, newer.stdout + newer.stderr
    assert "run ship-2 (shipment): INCOMPATIBLE: history event at stream sequence" in newer.stdout
    assert "2 runs of shipment replayed, 1 incompatible" in newer.stdout


async def test_replay_check_opens_sealed_runs_with_the_workers_keys(
    nats_server: EmbeddedServer, engine: Engine
) -> None:
    """It connected without NATFLOW_CODEC_KEYS: a sealed run's input reached the code as its
    envelope (a false INCOMPATIBLE), and a Replayer without the key called such a run ok."""
    key = bytes(range(32))
    sealed = await Client.connect(nats_server.url, codec=AesGcmCodec({"k1": key}, current="k1"))
    async with sealed, running_worker(sealed, [v1]):
        await sealed.start(v1, "parcel", run_id="sealed-ship")

        async def parked() -> bool:
            return any(isinstance(e, SignalWaited) for e in await sealed.history("sealed-ship"))

        await wait_for(parked, what="the run at its signal")
    keys = f"k1:{base64.b64encode(key).decode()}"
    checked = replay_check(nats_server.url, "tests.workflows_versions:patched", keys=keys)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "1 runs of shipment replayed, 0 incompatible" in checked.stdout
    keyless = replay_check(nats_server.url, "tests.workflows_versions:patched")
    assert keyless.returncode == 1, keyless.stdout + keyless.stderr
    assert "run sealed-ship (shipment): INCOMPATIBLE: " in keyless.stdout
    assert "'k1'" in keyless.stdout and "NATFLOW_CODEC_KEYS" in keyless.stdout
