"""Every example in examples/ runs to completion against a real server and worker."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from types import ModuleType

import anyio
import pytest
from natflow import Client, RunHandle, RunNotFound, Workflow
from natflow_engine import EmbeddedServer
from natflow_engine._engine import Engine

import examples
from examples.order import Receipt
from examples.workflows import WORKFLOWS
from tests.helpers import ROOT, running_worker
from tests.procs import OWNER_VARIABLE, command_line, gone, kill_all, owned_by


def example_modules() -> list[ModuleType]:
    """The modules of examples/ that start runs (they define ``demo(client)``)."""
    found = []
    for info in pkgutil.iter_modules(examples.__path__):
        module = importlib.import_module(f"examples.{info.name}")
        if callable(getattr(module, "demo", None)):
            found.append(module)
    return found


EXAMPLES = example_modules()


def test_every_example_is_served_and_run_by_the_demo() -> None:
    from examples import demo

    assert {m.__name__ for m in EXAMPLES} >= {"examples.greeting", "examples.order"}
    assert set(demo.EXAMPLES) == set(EXAMPLES)
    defined = {v for m in EXAMPLES for v in vars(m).values() if isinstance(v, Workflow)}
    assert defined == set(WORKFLOWS)


async def run_demo(client: Client, module: ModuleType) -> list[RunHandle]:
    handles: list[RunHandle] = await module.demo(client)
    assert handles, f"{module.__name__}.demo started no runs"
    for handle in handles:
        await handle.result(timeout=20)
    return handles


@pytest.mark.anyio
@pytest.mark.parametrize("module", EXAMPLES, ids=[m.__name__ for m in EXAMPLES])
async def test_example_runs_complete(client: Client, engine: Engine, module: ModuleType) -> None:
    async with running_worker(client, WORKFLOWS):
        handles = await run_demo(client, module)
    for handle in handles:
        info = await client.describe(handle.run_id)
        assert info.status == "completed", (handle.run_id, info.error)


async def test_greeting(client: Client) -> None:
    from examples import greeting

    async with running_worker(client, WORKFLOWS):
        (handle,) = await greeting.demo(client)
        assert await handle.result(timeout=20) == {"greeting": "Hello, Ada!"}
    steps = await client.steps(handle.run_id)
    assert [(s.name, s.status, s.result) for s in steps] == [("hello", "completed", "Hello, Ada!")]


async def test_order_with_good_and_bad_coupon(client: Client) -> None:
    from examples import order

    async with running_worker(client, WORKFLOWS):
        good, bad = await order.demo(client)
        assert await good.result(timeout=20) == Receipt(
            order_id="A-1", charge_id="ch-A-1", items=3, discount=0.1, notified=True
        )
        assert await bad.result(timeout=20) == Receipt(
            order_id="A-2", charge_id="ch-A-2", items=3, discount=0.0, notified=True
        )

    good_steps = {s.name: s for s in await client.steps(good.run_id)}
    assert all(s.status == "completed" for s in good_steps.values())
    assert good_steps["coupon"].result == 0.1
    assert good_steps["charge"].result["amount"] == pytest.approx(37.8)

    bad_steps = await client.steps(bad.run_id)
    assert [s.name for s in bad_steps] == [
        "reserve",
        "user",
        "orders",
        "coupon",
        "charge",
        "notify",
    ]
    by_name = {s.name: s for s in bad_steps}
    coupon = by_name["coupon"]
    assert coupon.status == "failed" and coupon.error is not None
    assert coupon.error.type == "ValueError" and "BOGUS" in coupon.error.message
    assert all(s.status == "completed" for s in bad_steps if s.name != "coupon")
    assert by_name["charge"].result["amount"] == 10.0
    info = await client.describe(bad.run_id)
    assert info.status == "completed" and info.result["discount"] == 0.0


async def test_demo_script_reports_every_run_completed(
    client: Client, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make demo`'s reporting loop (examples/demo.py run_examples) against this server."""
    from examples import demo

    async with running_worker(client, WORKFLOWS):
        failures = await demo.run_examples(client.connection.url)
    out = capsys.readouterr().out
    assert failures == 0, out
    for run_id in (
        "demo-greet-ada",
        "demo-order-a1",
        "demo-order-a2",
        "demo-sync-acme-1",
        "demo-sync-acme-2",
        "demo-sync-bolt-1",
        "reindex-d-readme-1",
    ):
        assert f"run {run_id}: completed" in out
    assert "-- examples/flow.py: Flow control" in out


def _pushed_at(step_result: str) -> float:
    """Seconds since midnight UTC of a push the flow example's step reports."""
    clock = datetime.strptime(step_result.rsplit(" at ", 1)[1], "%H:%M:%S.%f")
    return clock.hour * 3600 + clock.minute * 60 + clock.second + clock.microsecond / 1e6


async def test_flow_example_limits_a_customer_to_one_sync_spaces_pushes_and_debounces(
    client: Client, engine: Engine
) -> None:
    from examples import flow

    now = datetime.now(UTC)
    began = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
    async with running_worker(client, WORKFLOWS):
        acme_1, acme_2, bolt_1, reindex = await flow.demo(client)
        for handle in (acme_1, acme_2, bolt_1):
            assert (await handle.result(timeout=20))["pushed"] == 3
        assert await reindex.result(timeout=20) == "indexed 'readme': 5 words"

    pushes = {}
    for handle in (acme_1, acme_2, bolt_1):
        steps = await client.steps(handle.run_id)
        assert [s.name for s in steps] == ["push"] * 3
        # Times of day: mod a day, so a run across midnight still compares.
        pushes[handle.run_id] = [(_pushed_at(s.result) - began) % 86400 for s in steps]
    # One sync per customer at a time: acme's second begins after its first has pushed all.
    assert min(pushes[acme_2.run_id]) > max(pushes[acme_1.run_id])
    # 20/s shared by all runs: the 9th push's slot is 8 intervals after the first slot, which
    # is no sooner than the start (a late body only pushes later).
    assert max(max(times) for times in pushes.values()) >= 8 * flow.crm.interval
    # Five saves, one run, with the last text, taken by its first step.
    steps = await client.steps(reindex.run_id)
    assert [s.name for s in steps] == ["natflow-debounce", "index"]
    assert steps[0].result == {"doc": "readme", "text": "final text of the doc"}


@pytest.mark.slow
async def test_make_demo_uses_a_fresh_server_of_its_own_and_says_so(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """Issue 9: the demo used whatever server answered on NATFLOW_URL (without a word) and,
    with fixed run ids in a store that persists, showed an earlier demo's runs."""
    env = {**os.environ, "NATFLOW_URL": nats_server.url}
    with anyio.fail_after(120):
        done = await anyio.run_process(
            [sys.executable, str(ROOT / "examples" / "demo.py")], env=env, check=False
        )
    text = done.stdout.decode()
    assert done.returncode == 0, text + done.stderr.decode()[-2000:]
    found = re.search(r"a fresh natflow dev at (nats://\S+) \(store (\S+),", text)
    assert found, text
    assert found.group(1) != nats_server.url
    assert not await anyio.Path(found.group(2)).exists()  # removed at the end
    assert "all example runs completed" in text
    with pytest.raises(RunNotFound):  # nothing was written to the server that was running
        await client.describe("demo-greet-ada")


def _demo_worker_started(mark: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not any("examples.workflows:WORKFLOWS" in command_line(p) for p in owned_by(mark)):
        assert time.monotonic() < deadline, "the demo started no worker"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)],
    ids=["SIGTERM", "SIGHUP", "Ctrl-C"],
)
def test_make_demo_stopped_by_a_signal_stops_all_it_started(
    signum: signal.Signals, status: int
) -> None:
    """SIGTERM or SIGHUP (`timeout`, a CI runner, a closed terminal) ended demo.py at once and
    left natflow dev, its nats-server, the worker and the store behind; Ctrl-C stopped them but
    printed a KeyboardInterrupt traceback and exited -2 (natflow's commands: 130, quietly)."""
    mark = f"demo-{os.getpid()}-{signum.name}"  # this demo's processes, whichever session
    with subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env={**os.environ, OWNER_VARIABLE: mark, "PYTHONUNBUFFERED": "1"},  # lines at once
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as demo:
        try:
            _stop_the_demo_when_examples_run(demo, mark, signum, status)
        finally:
            demo.kill()
            kill_all(owned_by(mark))


def _stop_the_demo_when_examples_run(
    demo: subprocess.Popen[bytes], mark: str, signum: signal.Signals, status: int
) -> None:
    assert demo.stdout is not None and demo.stderr is not None
    first = demo.stdout.readline().decode()
    found = re.search(r"\(store (\S+),", first)
    assert found, first + demo.stderr.read().decode()[-2000:]
    store = found.group(1)
    try:
        _demo_worker_started(mark)
        while not (line := demo.stdout.readline()).startswith(b"-- examples/"):
            assert line, "the demo ended before its first example"  # EOF
        os.killpg(demo.pid, signum)  # as a terminal or `timeout` sends it: to the group
        assert demo.wait(timeout=60) == status
        errors = demo.stderr.read().decode()
        assert "Traceback" not in errors, errors
        assert [command_line(p) for p in gone(owned_by(mark), timeout=5)] == []
        assert not os.path.exists(store)
    finally:
        shutil.rmtree(store, ignore_errors=True)
