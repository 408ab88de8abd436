"""A traced workflow served by worker subprocesses (``tests.workflows_tracing:make_worker``).

Importing this module installs an OpenTelemetry tracer provider whose exporter appends each
ended span, as one JSON line, to the file named by ``NATFLOW_TEST_SPANS``: the spans a worker
process emits outlive its SIGKILL, and the test reads them from every process. Step bodies
append ``<run_id>:<step>`` to ``NATFLOW_TEST_COUNTS`` per execution; ``ship`` then waits for
the file ``<NATFLOW_TEST_GATE>/<run_id>``, so the test can kill the worker inside it.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
from natflow import Client, RetryPolicy, Worker, WorkflowContext, workflow
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

SPANS_ENV = "NATFLOW_TEST_SPANS"
COUNTS_ENV = "NATFLOW_TEST_COUNTS"
GATE_ENV = "NATFLOW_TEST_GATE"
LEASE_TTL = 2.0


def span_record(span: ReadableSpan) -> dict[str, object]:
    """The parts of a span the tests check, as plain JSON."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "links": [f"{link.context.span_id:016x}" for link in span.links],
        "pid": os.getpid(),
    }


class FileSpanExporter(SpanExporter):
    """Appends every exported span to a JSON-lines file (flushed at once)."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span)) + "\n" for span in spans)
        with self._lock, open(self._path, "a") as out:
            out.write(lines)
        return SpanExportResult.SUCCESS


if os.environ.get(SPANS_ENV):
    provider = TracerProvider(resource=Resource.create({"service.name": "natflow-test-worker"}))
    provider.add_span_processor(SimpleSpanProcessor(FileSpanExporter(os.environ[SPANS_ENV])))
    trace.set_tracer_provider(provider)

_attempts: Counter[str] = Counter()


def count(run_id: str, step: str) -> None:
    with open(os.environ[COUNTS_ENV], "a") as out:
        out.write(f"{run_id}:{step}\n")


def fetch(run_id: str) -> int:
    count(run_id, "fetch")
    with trace.get_tracer("tests").start_as_current_span("GET /inventory"):  # user's own span
        return 3


def charge(run_id: str, amount: int) -> int:
    """Fails on its first attempt in this process (a retry), then succeeds."""
    count(run_id, "charge")
    _attempts[run_id] += 1
    if _attempts[run_id] == 1:
        raise ConnectionError("payment gateway hiccup")
    return amount * 10


async def ship(run_id: str) -> str:
    count(run_id, "ship")
    gate = Path(os.environ[GATE_ENV]) / run_id
    while not gate.exists():  # noqa: ASYNC110 - the gate is opened by the test process
        await anyio.sleep(0.05)
    return "shipped"


@workflow(name="traced", retry=RetryPolicy(max_attempts=3, initial_interval=0.05, jitter=0))
async def traced(ctx: WorkflowContext) -> dict[str, object]:
    items = await ctx.step("fetch", fetch, ctx.run_id)
    paid = await ctx.step("charge", charge, ctx.run_id, items)
    shipped = await ctx.step("ship", ship, ctx.run_id)
    await ctx.sleep("cool-off", 0.2)
    approved = await ctx.wait_for_signal("approve", timeout=60)
    return {"paid": paid, "shipped": shipped, "approved": approved}


def make_worker(client: Client) -> Worker:
    return Worker(client, [traced], lease_ttl=LEASE_TTL)
