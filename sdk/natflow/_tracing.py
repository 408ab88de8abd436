"""OpenTelemetry traces of runs, when ``natflow[otel]`` is installed (no-ops otherwise).

A run is a trace. ``client.start`` opens a ``natflow start <workflow>`` span under the
caller's current span and stores its W3C trace context in the run's ``run_started`` event, so
every worker that ever drives the run (after a crash, a takeover, a long sleep) parents its
spans to the same place:

* ``natflow step <name>``: one span per step attempt, current while the step body runs (so the
  HTTP calls and queries inside it nest under it), with ``natflow.step.attempt``,
  ``natflow.step.retry`` (a retry of an earlier attempt) and ``natflow.step.outcome``;
* ``natflow sleep <name>`` and ``natflow signal <name>``: from the sleep or wait being
  recorded to the timer firing or the signal arriving;
* ``natflow run <workflow>``: from the start to the run's end, emitted by whoever records it.

Spans are made only from what a worker does live: a replay runs no step body and records
nothing, so it emits no span twice. A run started without a trace context (the command line,
another NATS client, a client without a tracer) still gets one trace: its parent is derived
from the run id. Nothing here talks to NATS; exporting is the application's tracer provider's
business.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict, deque
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from natflow_engine.events import (
    TERMINAL_EVENTS,
    Event,
    RunCancelled,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunStarted,
    SignalReceived,
    SignalWaited,
    TimerFired,
    TimerScheduled,
)

if TYPE_CHECKING:
    from ._commands import StepCommand

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
    )
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed: every hook below does nothing
    ENABLED = False
else:
    ENABLED = True

log = logging.getLogger("natflow.tracing")

TRACER_NAME = "natflow"
_found: list[Any] = []  # natflow's tracer, once a provider is set (OpenTelemetry sets one once)


def _tracer() -> Any:
    """natflow's tracer from the current global provider, or None when none is set."""
    if _found:
        return _found[0]
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):
        return None  # no provider configured: spans would go nowhere
    _found.append(provider.get_tracer(TRACER_NAME))
    return _found[0]


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000_000)


class _Starting:
    """What ``client.start`` needs from tracing: the carrier to store, and a way to say how
    the start went."""

    def __init__(self, span: Any = None, carrier: dict[str, str] | None = None) -> None:
        self._span = span
        self.carrier = carrier

    def started(self, run_id: str, created: bool) -> None:
        if self._span is not None:
            self._span.set_attribute("natflow.run_id", run_id)
            self._span.set_attribute("natflow.run.created", created)


@contextlib.contextmanager
def starting(workflow: str, queue: str) -> Iterator[_Starting]:
    """A ``natflow start <workflow>`` span, child of the caller's current span; yields the
    trace context to store in the run's start event (None when nothing is traced)."""
    tracer = _tracer() if ENABLED else None
    if tracer is None:
        yield _Starting()
        return
    with tracer.start_as_current_span(
        f"natflow start {workflow}",
        kind=SpanKind.PRODUCER,
        attributes={"natflow.workflow": workflow, "natflow.queue": queue},
    ) as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield _Starting(span, carrier or None)


def _run_began(start: RunStarted) -> datetime:
    """When the run itself began: a continued run's stretches share its first start."""
    if isinstance(start, RunContinued) and start.run_started_at is not None:
        return start.run_started_at
    return start.at


def _derived_parent(run_id: str, start: RunStarted) -> Any:
    """A stable remote parent for a run started without a trace context (one for all its
    stretches)."""
    digest = hashlib.sha256(f"{run_id}@{_run_began(start).isoformat()}".encode()).digest()
    context = SpanContext(
        trace_id=int.from_bytes(digest[:16], "big") or 1,
        span_id=int.from_bytes(digest[16:24], "big") or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(context))


def child_trace_context(run_id: str, start: RunStarted) -> dict[str, str] | None:
    """What a child run of this run stores as its trace context: the parent's own, or the
    parent derived from the parent's id, so a parent and its children make one trace (each
    child was a trace of its own)."""
    if start.trace_context:
        return dict(start.trace_context)
    if not ENABLED or _tracer() is None:
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=_derived_parent(run_id, start))
    return carrier or None


class RunTrace:
    """One execution's view of its run's trace: the parent context, and spans for what the
    execution records live (see the module docstring)."""

    def __init__(self, run_id: str, workflow: str, start: RunStarted, events: list[Event]) -> None:
        self.run_id, self.workflow, self._start = run_id, workflow, start
        self._token: object | None = None
        self._began: dict[int, datetime] = {}  # sleeps and waits by seq: when recorded
        self._waits: defaultdict[str, deque[SignalWaited]] = defaultdict(deque)
        self._parent: Any = None
        if not ENABLED or _tracer() is None:
            return  # nothing traces: cost nothing per event
        carrier = start.trace_context or {}
        parent = TraceContextTextMapPropagator().extract(carrier) if carrier else None
        if parent is None or not trace.get_current_span(parent).get_span_context().is_valid:
            parent = _derived_parent(run_id, start)
        self._parent = parent
        for event in events:
            self._follow(event)

    @property
    def traced(self) -> bool:
        """Whether this run is traced: a tracer provider was set when its execution began."""
        return self._parent is not None

    def attach(self) -> None:
        """Make the run's trace current in this task; step tasks started from it inherit it."""
        if self._parent is not None and self._token is None:
            self._token = otel_context.attach(self._parent)

    def detach(self) -> None:
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def recorded(self, event: Event) -> None:
        """An event this execution appended to history: emit what it ends."""
        if self._parent is None:
            return
        ended = self._follow(event)
        tracer = _tracer()
        if tracer is None:
            return
        if ended is not None:
            self._emit_wait(tracer, event, *ended)
        elif isinstance(event, TERMINAL_EVENTS):
            self._emit_run(tracer, event)

    def _follow(self, event: Event) -> tuple[str, str, datetime, str] | None:
        """Keep track of sleeps and waits; returns (kind, name, began, outcome) for one that
        ended."""
        if isinstance(event, TimerScheduled):
            self._began[event.seq] = event.at
        elif isinstance(event, SignalWaited):
            self._began[event.seq] = event.at
            self._waits[event.name].append(event)
        elif isinstance(event, TimerFired) and event.seq in self._began:
            waits = self._waits[event.name]
            wait = next((w for w in waits if w.seq == event.seq), None)
            if wait is not None:
                waits.remove(wait)
                return "signal", event.name, self._began.pop(event.seq), "timeout"
            return "sleep", event.name, self._began.pop(event.seq), "fired"
        elif isinstance(event, SignalReceived) and self._waits[event.name]:
            wait = self._waits[event.name].popleft()
            return "signal", event.name, self._began.pop(wait.seq, wait.at), "received"
        return None

    def _emit_wait(
        self, tracer: Any, event: Event, kind: str, name: str, began: datetime, outcome: str
    ) -> None:
        span = tracer.start_span(
            f"natflow {kind} {name}",
            context=self._parent,
            start_time=_ns(began),
            attributes={
                **self._attributes(),
                "natflow.wait.kind": kind,
                "natflow.wait.name": name,
                "natflow.wait.outcome": outcome,
            },
        )
        span.end(end_time=_ns(event.at))

    def _emit_run(self, tracer: Any, event: Event) -> None:
        status = type(event).__name__.removeprefix("Run").lower()
        span = tracer.start_span(
            f"natflow run {self.workflow}",
            context=self._parent,
            kind=SpanKind.CONSUMER,
            start_time=_ns(_run_began(self._start)),
            attributes={
                **self._attributes(),
                "natflow.queue": self._start.queue,
                "natflow.run.status": status,
            },
        )
        if isinstance(event, RunFailed):
            span.set_status(Status(StatusCode.ERROR, f"{event.error.type}: {event.error.message}"))
        elif isinstance(event, RunCompleted | RunCancelled):
            span.set_status(Status(StatusCode.OK))
        span.end(end_time=_ns(event.at))

    def _attributes(self) -> dict[str, str]:
        return {"natflow.run_id": self.run_id, "natflow.workflow": self.workflow}


@contextlib.contextmanager
def step_attempt(
    run_id: str, command: StepCommand, attempt: int, traced: bool = True
) -> Iterator[None]:
    """A ``natflow step <name>`` span around one attempt of a step body, current inside it.

    ``traced``: False for a run whose execution began with no tracer provider (its trace
    is decided once, not looked up again for every step)."""
    tracer = _tracer() if ENABLED and traced else None
    if tracer is None:
        yield
        return
    attributes = {
        "natflow.run_id": run_id,
        "natflow.workflow": command.workflow,
        "natflow.step.name": command.name,
        "natflow.step.occurrence": command.occurrence,
        "natflow.step.seq": command.seq,
        "natflow.step.attempt": attempt,
        "natflow.step.retry": attempt > 1,
        "natflow.step.max_attempts": command.retry.max_attempts,
    }
    with tracer.start_as_current_span(
        f"natflow step {command.name}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Exception as exc:
            span.set_attribute("natflow.step.outcome", "failed")
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        except BaseException:  # cancelled: the worker let the run go mid-attempt
            span.set_attribute("natflow.step.outcome", "cancelled")
            raise
        span.set_attribute("natflow.step.outcome", "completed")
