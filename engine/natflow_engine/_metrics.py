"""Prometheus metrics: everything natflow exports, and the ``/metrics`` endpoint.

Every metric is defined here, once, in prometheus-client's default registry, so a process that
runs the engine and a worker (or a user's own metrics) has one set and one endpoint; the SDK
imports its metrics from here because ``engine`` never imports ``sdk``. Label sets stay
bounded: workflow, step name, queue, status or outcome; never a run id, and never a worker's
identity (Prometheus's ``instance`` label tells the processes apart).

Who exports what:

* **engine, from history** (the dispatcher reads each run-level event once across all engine
  replicas, so ``sum`` over instances counts each run once): runs started and closed, run
  duration, non-determinism errors (blocked runs).
* **engine services**: reaper hand-backs (lease takeovers), timer lateness and firings,
  signals received and dead-lettered, schedule fires and their lateness, runs started by
  events and events dead-lettered.
* **engine poller** (``_engine_metrics.EngineMetrics``, every few seconds): per queue the consumer
  ``natflow-queue-<queue>`` counts from JetStream (backlog, in flight, redelivered, waiting
  pulls), live workers per queue from the worker registry, runs by status from the run index.
  Every engine replica exports the same numbers: aggregate them with ``max``.
* **workers**: steps recorded by outcome, step duration per attempt, schedule-to-start lag of
  tasks and of steps, retries, redelivered takeovers, fenced writes (a worker stepping back),
  signals delivered into history or rejected there, runs held, executions by outcome.
* **any process that writes many runs at once** (workers' and clients' history appends, the
  engine's run index and lifecycle events): atomic batches committed, and the appends in them.

Serve them with :func:`serve_metrics` (``natflow worker``/``engine``/``dev`` do, on
``--metrics-port``; a :class:`~natflow.Worker` used as a library does when given
``metrics_port``). ``natflow worker --processes N`` serves its children's, summed, with
:func:`serve_process_metrics`: each child writes its metrics to the supervisor's folder
(prometheus-client's multiprocess mode), where counters and histograms add up and the one
worker gauge (runs held) is the live children's sum.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, TypeVar, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from ._state import CLOSED_STATUSES, RunInfo, RunStatus
from .events import Event, RunBlocked, RunContinued, RunStarted

log = logging.getLogger("natflow.metrics")

DEFAULT_WORKER_PORT: Final = 9464
DEFAULT_ENGINE_PORT: Final = 9465
QUEUE_CONSUMER_PREFIX: Final = "natflow-queue-"
START_CONSUMER_PREFIX: Final = "natflow-start-"
RUN_STATUSES: Final[tuple[str, ...]] = get_args(RunStatus)

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
_RUN = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
_RUN_LONG = (86400.0, 604800.0)

# -- engine: from history -------------------------------------------------------------------

RUNS_STARTED = Counter("natflow_runs_started", "Runs started, by workflow.", ["workflow"])
RUNS_CLOSED = Counter(
    "natflow_runs_closed",
    "Runs that ended, by workflow and final status (completed, failed, cancelled, terminated).",
    ["workflow", "status"],
)
RUN_DURATION = Histogram(
    "natflow_run_duration_seconds",
    "Time from a run's start to its end, by workflow and final status.",
    ["workflow", "status"],
    buckets=_RUN + _RUN_LONG,
)
NONDETERMINISM = Counter(
    "natflow_nondeterminism_errors",
    "Replays that diverged from history (the run is held as blocked), by workflow.",
    ["workflow"],
)

# -- engine services ------------------------------------------------------------------------

TAKEOVERS = Counter(
    "natflow_lease_takeovers",
    "Runs moved to another worker: kind=reaped (the engine handed a dead worker's run back), "
    "kind=redelivered (a worker claimed a run whose task came back from another worker).",
    ["queue", "kind"],
)
TIMER_LATENESS = Histogram(
    "natflow_timer_lateness_seconds",
    "How long after its due time the engine woke a timer's run.",
    buckets=(*_FAST, 300.0, 3600.0),
)
TIMERS_FIRED = Counter(
    "natflow_timers_fired",
    "Timers whose run this engine woke (every engine replica wakes every timer).",
)
SCHEDULE_LATENESS = Histogram(
    "natflow_schedule_lateness_seconds",
    "From a schedule's fire time (plus its jitter) to the start of the fire's run.",
    buckets=(*_FAST, 300.0, 3600.0),
)
SCHEDULE_FIRES = Counter(
    "natflow_schedule_fires",
    "Schedule fires by what became of them: started, skipped, buffered, missed.",
    ["action"],
)
for _action in ("started", "skipped", "buffered", "missed"):
    SCHEDULE_FIRES.labels(_action)  # every series exists (at 0) before its first fire
EVENT_RUNS = Counter("natflow_event_runs_started", "Runs the event intake started.")
EVENTS_REJECTED = Counter(
    "natflow_events_rejected",
    "Events (or an event for one workflow) dead-lettered: body not JSON or not the input.",
)
SIGNALS_RECEIVED = Counter(
    "natflow_signals_received",
    "Signals the engine's intake accepted for a live run, by workflow (those the workflow "
    "receives: not cancel, terminate, pause, resume, or a child's outcome).",
    ["workflow"],
)
SIGNALS_REJECTED = Counter(
    "natflow_signals_rejected",
    "Signals not delivered: by=engine (dead-lettered by the intake), by=worker (recorded as "
    "signal_rejected in the run's history).",
    ["by"],
)

# -- workers --------------------------------------------------------------------------------

STEPS = Counter(
    "natflow_steps",
    "Step outcomes recorded in history, by workflow, step and outcome (completed, failed).",
    ["workflow", "step", "outcome"],
)
STEP_DURATION = Histogram(
    "natflow_step_duration_seconds",
    "Duration of one attempt of a step body, by workflow, step and outcome.",
    ["workflow", "step", "outcome"],
    buckets=_STEP,
)
STEP_LAG = Histogram(
    "natflow_step_schedule_to_start_seconds",
    "From a step being issued (or its retry coming due) to its body starting.",
    ["workflow", "step"],
    buckets=_FAST,
)
STEP_RETRIES = Counter(
    "natflow_step_retries", "Step attempts that failed and were retried.", ["workflow", "step"]
)
TASK_LAG = Histogram(
    "natflow_task_schedule_to_start_seconds",
    "From a task being enqueued to a worker taking it (first deliveries), by queue.",
    ["queue"],
    buckets=(*_FAST, 300.0),
)
FENCED = Counter(
    "natflow_fenced_writes",
    "Conditional writes refused because another worker holds the run (the worker steps back): "
    "write=claim, append or lease.",
    ["workflow", "write"],
)
SIGNALS_DELIVERED = Counter(
    "natflow_signals_delivered",
    "Signals a worker moved into a run's history, by workflow.",
    ["workflow"],
)
EXECUTIONS = Counter(
    "natflow_run_executions",
    "Times a worker drove a run, by workflow and how it ended (completed, failed, blocked, "
    "suspended, lost, handed_back).",
    ["workflow", "outcome"],
)
APPEND_BATCHES = Counter(
    "natflow_append_batches",
    "Atomic batches of many runs' appends committed, by stream (one fsync and one "
    "acknowledgement each; see natflow_appends_batched for the appends they carried).",
    ["stream"],
)
APPENDS_BATCHED = Counter(
    "natflow_appends_batched",
    "Appends that went to the server inside an atomic batch, by stream.",
    ["stream"],
)
RUNS_HELD = Gauge(
    "natflow_worker_runs_held",
    "Runs the workers of this process hold now.",
    multiprocess_mode="livesum",  # `natflow worker --processes N`: the live children's sum
)

# -- engine poller: snapshots from JetStream --------------------------------------------------


class Snapshot:
    """A gauge family replaced as a whole, so a scrape never sees half an update."""

    def __init__(self, name: str, documentation: str, labelnames: list[str]) -> None:
        self.name, self._doc, self._labels = name, documentation, labelnames
        self.values: Mapping[tuple[str, ...], float] = {}

    def set_all(self, values: Mapping[tuple[str, ...], float]) -> None:
        self.values = dict(values)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(self.name, self._doc, labels=self._labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(self.name, self._doc, labels=self._labels)


def _snapshot(name: str, documentation: str, labelnames: list[str]) -> Snapshot:
    gauge = Snapshot(name, documentation, labelnames)
    REGISTRY.register(gauge)
    return gauge


QUEUE_PENDING = _snapshot(
    "natflow_queue_tasks_pending",
    "Tasks and new runs' starts waiting for a worker (the queue's task and start consumers' "
    "num_pending): the backlog.",
    ["queue"],
)
QUEUE_ACK_PENDING = _snapshot(
    "natflow_queue_tasks_ack_pending",
    "Tasks and starts delivered to a worker and not yet acknowledged (num_ack_pending): runs "
    "in flight.",
    ["queue"],
)
QUEUE_REDELIVERED = _snapshot(
    "natflow_queue_tasks_redelivered",
    "Tasks and starts in flight that were delivered more than once (num_redelivered).",
    ["queue"],
)
QUEUE_WAITING = _snapshot(
    "natflow_queue_pull_requests_waiting",
    "Workers' pull requests waiting for tasks (num_waiting): idle capacity.",
    ["queue"],
)
WORKERS_LIVE = _snapshot(
    "natflow_workers_live",
    "Registered workers serving the queue and not draining (from natflow_workers).",
    ["queue"],
)
RUNS_BY_STATUS = _snapshot(
    "natflow_runs", "Runs in the run index, by workflow and status.", ["workflow", "status"]
)
TIMERS_PENDING = _snapshot(
    "natflow_timers_pending", "Timers the engine is waiting on (sleeps, timeouts, delays).", []
)
QUEUE_RUNS_PENDING = _snapshot(
    "natflow_queue_runs_pending",
    "Runs on the queue that no worker has taken yet (status pending, start delay passed).",
    ["queue"],
)
QUEUE_PENDING_AGE = _snapshot(
    "natflow_queue_oldest_pending_run_seconds",
    "How long the oldest run that no worker has taken has waited, by queue (0 if none).",
    ["queue"],
)

# -- engine poller: JetStream usage, from nats-server's monitoring endpoint (/jsz) ------------

JS_STREAM_MESSAGES = _snapshot(
    "natflow_jetstream_stream_messages", "Messages in a JetStream stream.", ["account", "stream"]
)
JS_STREAM_BYTES = _snapshot(
    "natflow_jetstream_stream_bytes", "Bytes stored by a JetStream stream.", ["account", "stream"]
)
JS_STREAM_MAX_MESSAGES = _snapshot(
    "natflow_jetstream_stream_max_messages",
    "A stream's max_msgs limit (streams without one have no sample).",
    ["account", "stream"],
)
JS_STREAM_MAX_BYTES = _snapshot(
    "natflow_jetstream_stream_max_bytes",
    "A stream's max_bytes limit (streams without one have no sample).",
    ["account", "stream"],
)
JS_STORAGE_BYTES = _snapshot(
    "natflow_jetstream_storage_bytes", "File storage the server's JetStream uses.", []
)
JS_STORAGE_LIMIT = _snapshot(
    "natflow_jetstream_storage_limit_bytes", "The server's JetStream max_file_store.", []
)
JS_MEMORY_BYTES = _snapshot(
    "natflow_jetstream_memory_bytes", "Memory storage the server's JetStream uses.", []
)
JS_MEMORY_LIMIT = _snapshot(
    "natflow_jetstream_memory_limit_bytes", "The server's JetStream max_memory_store.", []
)

# -- recording helpers ------------------------------------------------------------------------

_known_workflows: set[str] = set()


def _know(workflow: str) -> None:
    """Give a workflow's engine counters a zero sample, so rates and ratios have data."""
    if workflow in _known_workflows:
        return
    _known_workflows.add(workflow)
    for status in sorted(CLOSED_STATUSES):
        RUNS_CLOSED.labels(workflow, status)
    NONDETERMINISM.labels(workflow)
    SIGNALS_RECEIVED.labels(workflow)


def known_workflows() -> set[str]:
    """The workflows this process has named in its metrics (runs by status covers each)."""
    return set(_known_workflows)


def prepare_worker(workflows: Iterable[str], queues: Iterable[str]) -> None:
    """Give a worker's counters a zero sample before their first event."""
    SIGNALS_REJECTED.labels("worker")
    for queue in queues:
        TAKEOVERS.labels(queue, "redelivered")
    for workflow in workflows:
        SIGNALS_DELIVERED.labels(workflow)
        for write in ("claim", "append", "lease"):
            FENCED.labels(workflow, write)


def observe_run(event: Event, info: RunInfo) -> None:
    """Count a run-level event the engine's index just folded into ``info``."""
    _know(info.workflow)
    if isinstance(event, RunContinued):
        return  # the same run going on (continue-as-new), not a new one
    if isinstance(event, RunStarted):
        RUNS_STARTED.labels(info.workflow).inc()
    elif isinstance(event, RunBlocked):
        NONDETERMINISM.labels(info.workflow).inc()
    elif info.status in CLOSED_STATUSES:
        RUNS_CLOSED.labels(info.workflow, info.status).inc()
        closed = info.closed_at or event.at
        RUN_DURATION.labels(info.workflow, info.status).observe(
            max(0.0, (closed - info.created_at).total_seconds())
        )


M = TypeVar("M", Counter, Gauge, Histogram)
_children: dict[tuple[Any, ...], Any] = {}


def labelled(metric: M, *values: str) -> M:
    """``metric.labels(*values)``, remembered: the per-step path asks for the same few
    children again and again, and ``labels()`` validates and locks each time (~1.5 us).
    natflow never removes a child, so a remembered one stays the metric's own."""
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


@contextlib.contextmanager
def step_attempt(workflow: str, step: str, issued_at: float) -> Iterator[None]:
    """Observe a step attempt's schedule-to-start lag now and its duration when it ends."""
    began = time.monotonic()
    labelled(STEP_LAG, workflow, step).observe(max(0.0, began - issued_at))
    try:
        yield
    except Exception:
        labelled(STEP_DURATION, workflow, step, "failed").observe(time.monotonic() - began)
        raise
    labelled(STEP_DURATION, workflow, step, "completed").observe(time.monotonic() - began)


# -- the endpoint -------------------------------------------------------------------------------

_servers: dict[int, WSGIServer] = {}
_servers_lock = threading.Lock()


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve ``/metrics`` on ``host:port`` from a daemon thread; ``port`` 0 serves nothing.

    Loopback by default, as natflow's nats.conf binds: pass ``0.0.0.0`` (``--metrics-host``)
    for a Prometheus on another machine.

    Returns the port, or None when not serving. Serving a port this process already serves
    is a no-op. A port another process holds is logged and skipped: metrics are worth a
    warning, never a worker that refuses to start.
    """
    return _serve(port, host, REGISTRY)


def serve_process_metrics(port: int, host: str, folder: str) -> int | None:
    """Serve, as :func:`serve_metrics` does, the metrics of the processes that write them
    under ``folder`` (prometheus-client's multiprocess mode: each child started with
    ``PROMETHEUS_MULTIPROC_DIR`` set to it), summed over them: one endpoint for
    ``natflow worker --processes N``, whatever N."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    return _serve(port, host, registry)


def process_metrics_gone(pid: int, folder: str) -> None:
    """Drop a dead child's live gauges (its counters stay in the sums)."""
    multiprocess.mark_process_dead(pid, path=folder)  # type: ignore[no-untyped-call]


def _serve(port: int, host: str, registry: CollectorRegistry) -> int | None:
    if port <= 0:
        return None
    with _servers_lock:
        if port in _servers:
            return port
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            log.warning(
                "metrics not served: cannot listen on %s:%d (%s); pick another port with "
                "--metrics-port (or 0 for none)",
                host,
                port,
                exc,
            )
            return None
        _servers[port] = server
    log.info("metrics at http://%s:%d/metrics", host or "0.0.0.0", port)
    return port


def stop_metrics(port: int) -> None:
    """Stop serving ``port`` (tests; a CLI process serves until it exits)."""
    with _servers_lock:
        server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
