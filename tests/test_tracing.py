"""OpenTelemetry traces of runs (issue 19): one trace per run, one span per step attempt.

The test process traces the caller with the SDK's ``InMemorySpanExporter``; the worker
processes (``tests.workflows_tracing``) export to a JSON-lines file, so their spans survive
a SIGKILL and the test can read them all.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from natflow import Client, WorkflowContext, workflow
from natflow._tracing import RunTrace
from natflow_engine._engine import Engine
from natflow_engine._server import EmbeddedServer
from natflow_engine.events import (
    RunCompleted,
    RunContinued,
    RunStarted,
    TimerFired,
    TimerScheduled,
    decode_event,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers import count_lines, running_worker, spawn_worker, stop, wait_for
from tests.workflows_tracing import COUNTS_ENV, GATE_ENV, SPANS_ENV, span_record

TARGET = "tests.workflows_tracing:make_worker"
HISTORIES = Path(__file__).parent / "histories"

_exporter = InMemorySpanExporter()


@pytest.fixture
def caller_spans() -> InMemorySpanExporter:
    """The test process's tracer provider (global, so set once), its spans cleared."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    _exporter.clear()
    return _exporter


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_run_is_one_trace_with_a_span_per_step_attempt_across_a_worker_kill(
    client: Client,
    nats_server: EmbeddedServer,
    engine: Engine,
    caller_spans: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    spans_file, counts, gates = tmp_path / "spans.jsonl", tmp_path / "counts", tmp_path / "gates"
    gates.mkdir()
    env = {SPANS_ENV: str(spans_file), COUNTS_ENV: str(counts), GATE_ENV: str(gates)}
    run_id = "traced-1"
    worker_a = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-a.log")
    worker_b: subprocess.Popen[bytes] | None = None
    try:
        with trace.get_tracer("tests").start_as_current_span("POST /checkout"):
            handle = await client.start("traced", run_id=run_id)

        async def a_inside_ship() -> bool:
            return count_lines(counts)[f"{run_id}:ship"] == 1

        await wait_for(a_inside_ship, timeout=30, what="worker A inside step 'ship'")
        stop(worker_a, signal.SIGKILL)
        worker_b = spawn_worker(nats_server.url, TARGET, env=env, log=tmp_path / "worker-b.log")
        (gates / run_id).touch()

        async def waiting() -> bool:
            return (await client.describe(run_id)).status == "waiting"

        await wait_for(waiting, timeout=30, what="the run waiting for its signal")
        await client.signal(run_id, "approve", True)
        result = await handle.result(timeout=30)
        assert result == {"paid": 30, "shipped": "shipped", "approved": True}
        stop(worker_b, signal.SIGTERM)
    finally:
        stop(worker_a)
        if worker_b is not None:
            stop(worker_b)

    # The caller's span and natflow's start span, in this process.
    mine = {span.name: span_record(span) for span in caller_spans.get_finished_spans()}
    caller, start = mine["POST /checkout"], mine["natflow start traced"]
    assert start["parent_id"] == caller["span_id"] and start["trace_id"] == caller["trace_id"]
    assert start["attributes"]["natflow.run_id"] == run_id
    stored = (await client.history(run_id))[0]
    assert isinstance(stored, RunStarted) and stored.trace_context is not None
    assert start["span_id"] in stored.trace_context["traceparent"]

    # Every span the workers emitted belongs to the caller's trace; none is emitted twice.
    spans = read_spans(spans_file)
    assert {s["trace_id"] for s in spans} == {caller["trace_id"]}
    assert len({s["span_id"] for s in spans}) == len(spans)
    pid_a, pid_b = worker_a.pid, worker_b.pid
    steps = [s for s in spans if s["name"].startswith("natflow step ")]
    assert all(s["parent_id"] == start["span_id"] for s in steps)
    attempts = Counter(
        (
            s["attributes"]["natflow.step.name"],
            s["attributes"]["natflow.step.attempt"],
            s["attributes"]["natflow.step.retry"],
            s["attributes"]["natflow.step.outcome"],
            s["pid"],
        )
        for s in steps
    )
    # Worker A: fetch, charge failing once and retried. Its attempt at ship never ended (it
    # was killed inside it), so it left no span; worker B's replay re-ran no recorded step.
    assert attempts == Counter(
        {
            ("fetch", 1, False, "completed", pid_a): 1,
            ("charge", 1, False, "failed", pid_a): 1,
            ("charge", 2, True, "completed", pid_a): 1,
            ("ship", 1, False, "completed", pid_b): 1,
        }
    ), attempts
    assert count_lines(counts) == Counter(
        {f"{run_id}:fetch": 1, f"{run_id}:charge": 2, f"{run_id}:ship": 2}
    )

    # What runs inside a step body nests under its attempt's span.
    fetch = next(s for s in steps if s["attributes"]["natflow.step.name"] == "fetch")
    (inner,) = [s for s in spans if s["name"] == "GET /inventory"]
    assert inner["parent_id"] == fetch["span_id"]

    # The sleep, the signal wait and the run itself: one span each.
    others = Counter(s["name"] for s in spans if not s["name"].startswith("natflow step "))
    assert others == Counter(
        {
            "GET /inventory": 1,
            "natflow sleep cool-off": 1,
            "natflow signal approve": 1,
            "natflow run traced": 1,
        }
    )
    (signal_span,) = [s for s in spans if s["name"] == "natflow signal approve"]
    assert signal_span["attributes"]["natflow.wait.outcome"] == "received"
    (run_span,) = [s for s in spans if s["name"] == "natflow run traced"]
    assert run_span["attributes"]["natflow.run.status"] == "completed"
    assert run_span["parent_id"] == start["span_id"]


def test_the_sdk_works_without_opentelemetry() -> None:
    """With the otel extra absent, natflow imports and its tracing hooks do nothing."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
from datetime import UTC, datetime
import natflow
from natflow import RetryPolicy, _tracing
from natflow._commands import StepCommand
from natflow_engine.events import RunCompleted, RunStarted
assert not _tracing.ENABLED
start = RunStarted(at=datetime.now(UTC), workflow="w", queue="q")
run = _tracing.RunTrace("r", "w", start, [start])
run.attach()
run.recorded(RunCompleted(at=datetime.now(UTC)))
run.detach()
with _tracing.starting("w", "q") as traced:
    assert traced.carrier is None
    traced.started("r", True)
command = StepCommand(seq=1, name="s", future=None, occurrence=1, fn=print, args=(), kwargs={},
                      retry=RetryPolicy(), timeout=None, result_type=None)
with _tracing.step_attempt("r", command, 1):
    pass
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_recorded_start_event_puts_the_run_in_its_callers_trace(
    caller_spans: InMemorySpanExporter,
) -> None:
    """The trace context in a recorded run_started (tests/histories) is where a worker's spans
    go; what history already holds emits nothing, what is recorded live emits once."""
    lines = (HISTORIES / "traced-greet-ada.jsonl").read_bytes().splitlines()
    events = [decode_event(line) for line in lines]
    start = events[0]
    assert isinstance(start, RunStarted) and start.trace_context is not None
    trace_id = start.trace_context["traceparent"].split("-")[1]
    parent_id = start.trace_context["traceparent"].split("-")[2]

    replayed = RunTrace("traced-greet-ada", "greet", start, events)
    assert caller_spans.get_finished_spans() == ()  # a replay of the whole history: nothing
    replayed.recorded(events[-1])  # as if this execution had recorded the end live
    (run,) = [span_record(s) for s in caller_spans.get_finished_spans()]
    assert run["name"] == "natflow run greet"
    assert (run["trace_id"], run["parent_id"]) == (trace_id, parent_id)


def test_a_run_started_without_a_trace_context_is_still_one_trace(
    caller_spans: InMemorySpanExporter,
) -> None:
    """`natflow start`, another NATS client or an untraced client store no context: every
    worker derives the same parent from the run, so the run's spans still share one trace."""
    start = RunStarted(id="plain-1:1", at=datetime.now(UTC), workflow="w", queue="q")
    sleep = TimerScheduled(at=start.at, seq=1, name="nap", due_at=start.at)
    first, second = (RunTrace("plain-1", "w", start, [start, sleep]) for _ in range(2))
    first.recorded(TimerFired(at=datetime.now(UTC), seq=1, name="nap"))  # worker A
    second.recorded(RunCompleted(at=datetime.now(UTC)))  # worker B, after a takeover
    nap, run = (span_record(s) for s in caller_spans.get_finished_spans())
    assert (nap["name"], run["name"]) == ("natflow sleep nap", "natflow run w")
    assert nap["trace_id"] == run["trace_id"] and nap["parent_id"] == run["parent_id"]
    other = RunStarted(id="plain-2:1", at=start.at, workflow="w", queue="q")
    RunTrace("plain-2", "w", other, [other]).recorded(RunCompleted(at=datetime.now(UTC)))
    assert span_record(caller_spans.get_finished_spans()[-1])["trace_id"] != run["trace_id"]


def test_a_continued_run_is_one_trace_and_its_run_span_covers_every_stretch(
    caller_spans: InMemorySpanExporter,
) -> None:
    """Each stretch's start is a run_continued with a time of its own: the derived parent
    (and so the trace) changed with every stretch, and the run span began at the last one."""
    began = datetime.now(UTC) - timedelta(seconds=30)
    start = RunStarted(id="cont-1:1", at=began, workflow="w", queue="q")
    sleep = TimerScheduled(at=began, seq=1, name="nap", due_at=began)
    RunTrace("cont-1", "w", start, [start, sleep]).recorded(
        TimerFired(at=began + timedelta(seconds=1), seq=1, name="nap")
    )
    later = RunContinued(
        id="cont-1:9",
        at=began + timedelta(seconds=20),
        workflow="w",
        queue="q",
        stretch=2,
        run_started_at=began,
    )
    RunTrace("cont-1", "w", later, [later]).recorded(RunCompleted(at=datetime.now(UTC)))
    nap, run = caller_spans.get_finished_spans()
    assert nap.context.trace_id == run.context.trace_id
    assert run.start_time == int(began.timestamp() * 1e9)


def test_a_child_run_is_in_its_parents_trace(caller_spans: InMemorySpanExporter) -> None:
    """A child's start stored no trace context: each child run was a trace of its own."""
    from natflow._tracing import child_trace_context

    now = datetime.now(UTC)
    parent = RunStarted(id="p-1:1", at=now, workflow="p", queue="q")
    context = child_trace_context("p-1", parent)
    child = RunStarted(id="c-1:1", at=now, workflow="c", queue="q", trace_context=context)
    RunTrace("c-1", "c", child, [child]).recorded(RunCompleted(at=datetime.now(UTC)))
    RunTrace("p-1", "p", parent, [parent]).recorded(RunCompleted(at=datetime.now(UTC)))
    kid, mother = caller_spans.get_finished_spans()
    assert kid.context.trace_id == mother.context.trace_id
    traced = RunStarted(id="p-2:1", at=now, workflow="p", queue="q", trace_context={"a": "b"})
    assert child_trace_context("p-2", traced) == {"a": "b"}  # the parent's caller's, as is


@workflow(name="traced_kid")
async def traced_kid(ctx: WorkflowContext, n: int) -> int:
    return n + 1


@workflow(name="traced_parent")
async def traced_parent(ctx: WorkflowContext, n: int) -> int:
    return int(await ctx.child(traced_kid, n)) + int(await ctx.child(traced_kid, n + 1))


async def test_a_parent_and_its_children_run_as_one_trace(
    client: Client, engine: Engine, caller_spans: InMemorySpanExporter
) -> None:
    async with running_worker(client, [traced_parent, traced_kid]):
        handle = await client.start("traced_parent", 1, run_id="traced-family")
        assert await handle.result(timeout=15) == 5
    runs = [s for s in caller_spans.get_finished_spans() if s.name.startswith("natflow run")]
    assert sorted(s.name for s in runs) == [
        "natflow run traced_kid",
        "natflow run traced_kid",
        "natflow run traced_parent",
    ]
    assert len({s.context.trace_id for s in runs}) == 1
