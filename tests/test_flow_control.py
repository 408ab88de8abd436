"""Flow control (issue 18, rates half): rate limits shared by every worker, singleton,
debounce, per-run step parallelism, and the run view of a run that waits on a rate limit.

Against a real nats-server; the shared rate limit runs in three real worker processes and
reads the calls' times from a file the step bodies write (outside the workers).
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
from natflow import (
    AesGcmCodec,
    Client,
    Debounce,
    InvalidInput,
    RateLimit,
    RunCancelled,
    WorkflowContext,
    workflow,
)
from natflow._steps import RunSlots
from natflow_engine import RATES_BUCKET, cell_key, reserve
from natflow_engine._flow_starts import _base_id
from natflow_engine._kv import kv_entries
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import RunStarted, StepStarted

from tests import workflows_flow as flows
from tests.helpers import running_worker, spawn_worker, wait_for
from tests.workflows_waits import registered


def call_times(log: Path) -> list[float]:
    if not log.exists():
        return []
    return sorted(float(line.split()[1]) for line in log.read_text().splitlines() if line)


@pytest.mark.slow
async def test_a_step_rate_limit_of_10_per_second_holds_across_three_worker_processes(
    nats_server: EmbeddedServer,
    client: Client,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    log = tmp_path / "calls.log"
    for _ in range(3):
        processes.append(
            spawn_worker(  # 4 runs each at most: the 10 runs need all three workers
                nats_server.url,
                "tests.workflows_flow:rated_calls",
                "--max-concurrent-runs",
                "4",
                env={"FLOW_LOG": str(log)},
                log=tmp_path / "workers.log",
            )
        )
    await registered(client, 3)
    began = time.time()
    handles = [await client.start(flows.rated_calls, 10 * r) for r in range(10)]
    results = [await h.result(timeout=30) for h in handles]
    assert sorted(i for run in results for i in run) == list(range(100))
    holders = {(await h.status()).worker for h in handles}
    times = call_times(log)
    assert len(times) == 100
    # From asking for the first call to the last call made: the slots are exactly 0.1 s
    # apart, so the last is at least 9.9 s after the first could go.
    span = times[-1] - began
    print(f"100 calls: {span:.3f} s from the starts, {times[-1] - times[0]:.3f} s first to last")
    assert 9.9 <= span <= 11.0, f"100 calls took {span:.2f} s"
    # Nowhere more than 10 calls in a second (11 calls span at least 1 s, less the jitter of
    # a call's body starting after its slot).
    assert min(times[i + 10] - times[i] for i in range(90)) >= 0.9
    assert len(holders) == 3, f"the runs were meant to spread over the workers: {holders}"


async def test_reserve_spaces_slots_by_the_interval_and_allows_the_burst(
    client: Client,
) -> None:
    conn = client.connection
    even = RateLimit("flow-unit-even", limit=20, period=1.0)
    slots = [await reserve(conn, even, "k") for _ in range(5)]
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    assert all(abs(g - 0.05) < 1e-6 for g in gaps), gaps
    bursty = RateLimit("flow-unit-burst", limit=10, period=1.0, burst=3)
    now = time.time()
    slots = [await reserve(conn, bursty) for _ in range(5)]
    assert all(s <= now + 0.5 for s in slots[:3])  # three at once after an idle spell
    assert slots[3] - slots[0] >= 0.1 - 1e-6
    # Per key: another key has its own budget.
    assert await reserve(conn, even, "other") <= time.time()


async def test_a_step_waiting_on_a_rate_limit_says_so_in_the_run_view(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [flows.throttled_pair]):
        handle = await client.start(flows.throttled_pair)

        async def limited() -> str | None:
            current = (await handle.status()).current or ""
            return current if "rate limited until" in current else None

        current = await wait_for(limited, timeout=10, what="a rate-limited step in the view")
        assert "step 'slow'" in current and "flow-test-slow" in current
        started = [e for e in await client.history(handle.run_id) if isinstance(e, StepStarted)]
        assert any(e.rate_limited_until is not None for e in started)
        await client.terminate(handle.run_id, "done looking")


async def test_a_run_rate_limit_delays_starts_instead_of_refusing_them(
    client: Client, nats_server: EmbeddedServer
) -> None:
    handles = [await client.start(flows.rated_start, {"tenant": "acme", "i": i}) for i in range(4)]
    infos = [await h.status() for h in handles]
    assert infos[0].current is None or "rate limited" not in infos[0].current
    assert "rate limited until" in (infos[3].current or ""), infos[3].current
    assert "flow-test-starts" in (infos[3].current or "")
    other = await client.start(flows.rated_start, {"tenant": "globex", "i": 0})
    assert "rate limited" not in ((await other.status()).current or "")  # its own budget
    # Delayed starts take their slots from their start time on: still 2 a second.
    now = time.time()
    later = [
        await client.start(flows.rated_start, {"tenant": "initech", "i": i}, start_delay=30)
        for i in range(3)
    ]
    due = [(await client.history(h.run_id))[0].not_before for h in later]  # type: ignore[attr-defined]
    stamps = [d.timestamp() for d in due]
    assert stamps[0] >= now + 30
    assert all(b - a >= 0.5 - 1e-3 for a, b in itertools.pairwise(stamps)), stamps
    # The run id is the start's idempotency key here too: it was dropped, and a retried start
    # made a second run and took a second slot.
    keyed = [
        await client.start(flows.rated_start, {"tenant": "hooli", "i": 1}, run_id="rated-123")
        for _ in range(2)
    ]
    assert [h.run_id for h in keyed] == ["rated-123", "rated-123"]
    for handle in [*handles, other, *later, keyed[0]]:
        await client.terminate(handle.run_id, "test over")


async def test_singleton_start_returns_the_open_run_and_a_new_one_once_it_closed(
    client: Client, engine: object
) -> None:
    async with running_worker(client, [flows.one_per_customer]):
        first = await client.start(flows.one_per_customer, {"customer": "acme", "n": 1})
        again = await client.start(flows.one_per_customer, {"customer": "acme", "n": 2})
        assert again.run_id == first.run_id
        racing = await _gather_starts(client, {"customer": "acme", "n": 3}, 5)
        assert {h.run_id for h in racing} == {first.run_id}
        other = await client.start(flows.one_per_customer, {"customer": "globex"})
        assert other.run_id != first.run_id
        await client.signal(first.run_id, "go", "done")
        assert await first.result(timeout=10) == "done"
        after = await client.start(flows.one_per_customer, {"customer": "acme", "n": 4})
        assert after.run_id != first.run_id
        assert (await after.status()).status in ("pending", "running", "waiting")
        with pytest.raises(InvalidInput, match="run_id"):
            await client.start(flows.one_per_customer, {"customer": "acme"}, run_id="mine")
        for handle in (other, after):
            await client.terminate(handle.run_id, "test over")


async def _gather_starts(client: Client, input: dict[str, object], n: int) -> list[object]:
    handles: list[object] = []

    async def start() -> None:
        handles.append(await client.start(flows.one_per_customer, input))

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(start)
    return handles


async def test_debounce_collapses_ten_starts_in_half_a_second_into_one_run_with_the_last_input(
    client: Client,
    engine: object,
    nats_server: EmbeddedServer,
    processes: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    for _ in range(2):
        processes.append(
            spawn_worker(
                nats_server.url,
                "tests.workflows_flow:debounced_save",
                log=tmp_path / "workers.log",
            )
        )
    await registered(client, 2)
    handles = []
    began = time.monotonic()
    for i in range(10):
        handles.append(await client.start(flows.debounced_save, {"doc": "d1", "v": i}))
        if i == 0:  # the window is open for a second yet
            assert "debounced: starts at" in ((await handles[0].status()).current or "")
        await anyio.sleep(0.04)
    took = time.monotonic() - began
    assert took < 1.0, f"the 10 starts took {took:.2f} s: the machine is too slow for a 1 s window"
    other = [await client.start(flows.debounced_save, {"doc": "d2", "v": v}) for v in (1, 2)]
    assert len({h.run_id for h in handles}) == 1
    assert other[0].run_id == other[1].run_id != handles[0].run_id  # one window per key
    assert await handles[0].result(timeout=10) == {"doc": "d1", "v": 9}
    assert await other[0].result(timeout=10) == {"doc": "d2", "v": 2}

    async def indexed() -> list[str] | None:
        runs = sorted(r.run_id for r in await client.list(workflow="debounced_save"))
        return runs if len(runs) >= 2 else None  # the index follows history a moment later

    runs = await wait_for(indexed, what="both runs in the index")
    assert runs == sorted([handles[0].run_id, other[0].run_id])
    steps = await client.steps(handles[0].run_id)
    assert [s.name for s in steps] == ["natflow-debounce"]  # the input, taken once
    # The window has passed and its run took its input: the next start is a new run.
    later = await client.start(flows.debounced_save, {"doc": "d1", "v": 10})
    assert later.run_id != handles[0].run_id
    assert await later.result(timeout=10) == {"doc": "d1", "v": 10}


async def test_ctx_parallel_runs_at_most_max_parallel_steps_at_once(
    client: Client, nats_server: EmbeddedServer
) -> None:
    async with running_worker(client, [flows.wide_fanout, flows.unbounded_fanout]):
        flows.LIVE.update(now=0, peak=0)
        assert await (await client.start(flows.wide_fanout, 40)).result(timeout=20) == 780
        assert flows.LIVE["peak"] == 3
        flows.LIVE.update(now=0, peak=0)
        assert await (await client.start(flows.unbounded_fanout, 40)).result(timeout=20) == 780
        assert flows.LIVE["peak"] > 3  # the bound above was the option's, not the worker's


async def test_unlimited_workflows_never_touch_the_rates_bucket(
    client: Client, nats_server: EmbeddedServer
) -> None:
    @workflow
    async def plain(ctx: WorkflowContext, x: int) -> int:
        return await ctx.step("double", _double, x)

    async with running_worker(client, [plain]):
        assert await (await client.start(plain, 2)).result(timeout=10) == 4
    assert RATES_BUCKET not in client.connection.extras
    # The one entry is the worker's declaration (written once as it starts): "nothing".
    entries = await kv_entries(client.connection, RATES_BUCKET)
    assert [(m.headers or {}).get("Nats-Subject") for m in entries] == [
        f"$KV.{RATES_BUCKET}.decl.plain"
    ]


def _double(x: int) -> int:
    return 2 * x


def test_flow_options_are_checked_when_the_decorator_runs() -> None:
    async def fn(ctx: WorkflowContext) -> None: ...

    with pytest.raises(InvalidInput, match="max_parallel_steps"):
        workflow(max_parallel_steps=0)(fn)
    with pytest.raises(InvalidInput, match="singleton or debounced"):
        workflow(singleton=True, debounce=1.0)(fn)
    with pytest.raises(InvalidInput, match="debounce window"):
        Debounce(0)
    with pytest.raises(InvalidInput, match="rate limit name"):
        RateLimit("has space", limit=1)


async def test_a_debounced_run_cancelled_in_its_window_leaves_its_key_to_the_next_start(
    client: Client, engine: object
) -> None:
    """It never took its window's input, so every later start of the key joined it: the
    input was dropped and the caller got RunCancelled, for good."""
    async with running_worker(client, [flows.debounced_save]):
        first = await client.start(flows.debounced_save, {"doc": "c1", "v": 1})
        await client.cancel(first.run_id, "not this one")
        with pytest.raises(RunCancelled):
            await first.result(timeout=15)
        again = await client.start(flows.debounced_save, {"doc": "c1", "v": 2})
        assert again.run_id != first.run_id
        assert await again.result(timeout=15) == {"doc": "c1", "v": 2}


async def test_flow_control_refuses_bad_keys_and_oversized_debounced_inputs(
    client: Client, nats_server: EmbeddedServer
) -> None:
    with pytest.raises(InvalidInput, match="no field 'customer'"):
        await client.start(flows.one_per_customer, {"name": "acme"})
    with pytest.raises(InvalidInput, match="debounced inputs wait in KV"):
        await client.start(flows.debounced_save, {"doc": "d", "blob": "x" * 600_000})
    assert await client.list(workflow="one_per_customer") == []
    async with await Client.connect(nats_server.url, start_via_engine=True) as frontend:
        # A key function cannot travel to the engine: refused before any request.
        with pytest.raises(InvalidInput, match="singleton key with a function"):
            await frontend.start(flows.one_per_customer_fn, {"customer": "acme"})


async def test_run_slots_pass_a_slot_on_when_its_waiter_is_cancelled() -> None:
    slots = RunSlots(1)
    await slots.acquire()
    first = asyncio.ensure_future(slots.acquire())
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to `first` ...
    first.cancel()  # ... which is cancelled before it runs: `second` must get the slot
    await asyncio.sleep(0)
    await asyncio.wait_for(second, timeout=1)
    assert first.cancelled()
    slots.release()
    await asyncio.wait_for(slots.acquire(), timeout=1)  # nothing leaked, nothing lost


async def test_a_debounced_input_waits_in_kv_sealed_under_a_codec(
    nats_server: EmbeddedServer, engine: object
) -> None:
    codec = AesGcmCodec({"k1": bytes(range(32))}, current="k1")
    sealed = await Client.connect(nats_server.url, codec=codec)
    async with sealed, running_worker(sealed, [flows.debounced_save]):
        first = await sealed.start(flows.debounced_save, {"doc": "secret-doc", "v": 1})
        await sealed.start(flows.debounced_save, {"doc": "secret-doc", "v": 2})
        cells = await kv_entries(sealed.connection, RATES_BUCKET)
        assert cells and all(b"secret-doc" not in m.data for m in cells)
        assert await first.result(timeout=10) == {"doc": "secret-doc", "v": 2}


async def test_a_flow_controlled_start_keeps_its_priority(client: Client) -> None:
    """A singleton start goes through the flow path, which once dropped ``priority``."""
    handle = await client.start(flows.one_per_customer, {"customer": "prio"}, priority=7)
    history = await client.history(handle.run_id)
    started = history[0]
    assert isinstance(started, RunStarted)
    assert started.priority == 7
    await client.terminate(handle.run_id, "test over")


async def test_takers_in_one_process_do_not_lose_their_turns_to_each_other(
    client: Client, nats_server: EmbeddedServer
) -> None:
    """80 rate-limited steps of one ctx.parallel, 30 starts of one debounced key and 100 of
    a rate-limited workflow, all at once from one process: each took its cell by a
    revision-checked write against the others, lost up to 20-50 times in a row and failed
    ("takes in a row lost to other processes"); the debounce burst lost inputs."""
    async with running_worker(client, [flows.rated_fanout]):
        handle = await client.start(flows.rated_fanout, 80)
        assert await handle.result(timeout=30) == 80
    debounced = await asyncio.gather(
        *(client.start(flows.debounced_save, {"doc": "burst", "v": i}) for i in range(30))
    )
    assert len({h.run_id for h in debounced}) == 1
    rated = await asyncio.gather(
        *(client.start(flows.rated_start, {"tenant": "t", "i": i}) for i in range(100))
    )
    assert len({h.run_id for h in rated}) == 100


async def test_a_singleton_key_is_the_same_however_the_run_is_started(
    client: Client, engine: object
) -> None:
    """A datetime field was keyed as str(datetime) with the definition and as its JSON text
    by name: two runs of one key were open at once."""
    from tests.test_flow_everywhere import declared_by_worker

    async with running_worker(client, [flows.one_per_instant]):
        await declared_by_worker(client, "one_per_instant")  # what a start by name applies
        at = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
        by_struct = await client.start(flows.one_per_instant, flows.Reading(sensor="s", at=at))
        as_json = {"sensor": "s", "at": "2026-11-28T03:00:00Z"}  # as msgspec writes it
        by_dict = await client.start(flows.one_per_instant, as_json)
        by_name = await client.start("one_per_instant", as_json)
        assert by_struct.run_id == by_dict.run_id == by_name.run_id
        await client.signal(by_struct.run_id, "go", "done")
        assert await by_struct.result(timeout=10) == "done"


def test_rate_limits_and_key_fields_are_checked_when_made() -> None:
    with pytest.raises(InvalidInput, match="leaves no time between calls"):
        RateLimit("huge", limit=10**400)  # every start raised OverflowError
    for key in ("a..b", ".", " ", ""):
        with pytest.raises(InvalidInput, match=r"not an input field's name|leave it out"):
            RateLimit("keyed", limit=1, key=key)
        with pytest.raises(InvalidInput, match="not an input field's name"):
            Debounce(1.0, key=key)


def test_no_two_workflows_or_keys_share_a_singleton_or_debounce_cell() -> None:
    """The parts were joined by "-", which names and keys may hold: "rep" with key "x-s-y"
    and "rep-s-x" with key "y" were one cell and one run (the second start was refused as a
    start of the first's run id); and a key that looked like a hash named that key's cell."""
    long = "w" * 60
    pairs = [
        (("s", "rep", "x-s-y"), ("s", "rep-s-x", "y")),
        (("d", "rep", "x-d-y"), ("d", "rep-d-x", "y")),
        (("s", "a", "s-b"), ("s", "a-s", "b")),
        (("s", long, "k"), ("s", long + "x", "k")),
    ]
    for one, other in pairs:
        assert _base_id(*one) != _base_id(*other), (one, other)
    hashed = _base_id("s", "wf", "acme corp").rsplit("-", 1)[-1]
    assert hashed.startswith("h") and _base_id("s", "wf", hashed) != _base_id(
        "s", "wf", "acme corp"
    )
    # Names and keys that were already plain read as before (open singletons keep their cell).
    assert _base_id("s", "order-flow", "acme-1") == "order-flow-s-acme-1"
    assert _base_id("d", "sync", None) == "sync-d-_"
    rate_hashed = cell_key("imports", "acme corp").split(".k", 1)[1]
    assert cell_key("imports", rate_hashed) != cell_key("imports", "acme corp")
    assert cell_key("imports", "acme") == "imports.kacme"


async def test_deleting_a_debounced_or_singleton_run_drops_its_cell_and_the_input_in_it(
    client: Client, engine: object
) -> None:
    """One cell per key stayed for good in natflow_rates, each with the latest input of a run
    deleted long ago (readable by anyone who may read the bucket)."""
    async with running_worker(client, [flows.debounced_save, flows.one_per_customer]):
        saved = await client.start(flows.debounced_save, {"doc": "gone", "v": "secret"})
        assert await saved.result(timeout=15) == {"doc": "gone", "v": "secret"}
        single = await client.start(flows.one_per_customer, {"customer": "gone"})
        await client.signal(single.run_id, "go", "done")
        assert await single.result(timeout=15) == "done"
        for handle in (saved, single):
            await client.delete(handle.run_id)
    cells = [
        (m.headers or {}).get("Nats-Subject", m.subject)
        for m in await kv_entries(client.connection, RATES_BUCKET)
    ]
    assert not [key for key in cells if "gone" in key], cells


async def test_a_declaration_already_stored_is_not_written_again(client: Client) -> None:
    """Each worker rewrote its workflows' declarations (flow control, event triggers) at its
    start: one started while the server's store was full exited on the write."""
    from datetime import timedelta

    from natflow._flow import declaration_of
    from natflow_engine._flow_decls import declaration_key, publish_declarations
    from natflow_engine._kv import kv_get
    from natflow_engine._triggers import TRIGGERS_BUCKET, TriggerDeclaration, declare
    from natflow_engine.events import utcnow

    conn = client.connection
    decl = declaration_of(flows.debounced_save)
    await publish_declarations(conn, [decl])
    first = await kv_get(conn, RATES_BUCKET, declaration_key(decl.workflow))
    await publish_declarations(conn, [decl])
    assert await kv_get(conn, RATES_BUCKET, declaration_key(decl.workflow)) == first
    now = utcnow()
    trigger = TriggerDeclaration(event="e1", workflow="w", queue="q", declared_at=now)
    await declare(conn, trigger)
    stored = [m.data for m in await kv_entries(conn, TRIGGERS_BUCKET)]
    later = msgspec.structs.replace(
        trigger, declared_at=now + timedelta(seconds=5), declared_by="another"
    )
    await declare(conn, later)  # the same wish, from another worker: kept as it was
    assert [m.data for m in await kv_entries(conn, TRIGGERS_BUCKET)] == stored
    await declare(conn, msgspec.structs.replace(later, queue="q2"))  # changed: written
    assert [m.data for m in await kv_entries(conn, TRIGGERS_BUCKET)] != stored
