"""natflow's durable core: event schema, streams, history store, task queue, engine services.

Applications import :mod:`natflow`; this package is what the SDK, the engine services and the
``natflow`` command line are built on. Its names below are the engine's face: the SDK imports
only these (and the public :mod:`natflow_engine.events` schema), never a private module, and
nothing here imports the SDK (``tests/test_layout.py`` checks both).
"""

from . import events
from ._cli import add_metrics_options, connect_options
from ._codec import decode_value, encode_value, error_info
from ._connection import TRANSIENT, Connection, connect, default_url, redact_url, wrap
from ._durations import to_seconds
from ._engine import DISPATCHER
from ._errors import (
    ConnectionRefused,
    ErrorInfo,
    InvalidInput,
    NatflowError,
    NonDeterminismError,
    PermissionDenied,
    RunCancelled,
    RunFailed,
    RunNotFound,
    ServerUnavailable,
    SignalTimeout,
    StepError,
    StepTimeout,
)
from ._history import AppendConflict, History, HistoryStore
from ._index import RunIndex
from ._leases import Lease, Leases
from ._logs import fields
from ._metrics import (
    DEFAULT_WORKER_PORT,
    EXECUTIONS,
    FENCED,
    RUNS_HELD,
    SIGNALS_DELIVERED,
    SIGNALS_REJECTED,
    STEP_RETRIES,
    STEPS,
    TAKEOVERS,
    TASK_LAG,
    prepare_worker,
    serve_metrics,
    step_attempt,
)
from ._names import check_queue, check_run_id, check_step_name, check_token, check_workflow_name
from ._registry import (
    WorkerInfo,
    announce,
    connected_user,
    ping_subject,
    safe_identity,
    withdraw,
)
from ._retry import NO_RETRY, RetryPolicy
from ._runs import Runs, new_run_id
from ._schedule_ops import Schedules
from ._schedules import OVERLAP_POLICIES, ScheduleFire, ScheduleInfo, ScheduleSpec, check_spec
from ._sealing import (
    AesGcmCodec,
    MissingKey,
    PayloadCodec,
    open_event,
    open_events,
    open_sealed,
    seal,
    sealed_key,
)
from ._server import EmbeddedServer
from ._signals import (
    CANCEL,
    CONTROL,
    TERMINATE,
    BadSignal,
    last_signal_seq,
    parse,
    pending_signals,
    run_created_at,
    send,
    sequence,
    stored_at,
)
from ._start_service import request_start
from ._state import CLOSED_STATUSES, RunInfo, StepInfo, fold_run
from ._streams import (
    HISTORY_PREFIX,
    HISTORY_STREAM,
    RUNS_STREAM,
    TASK_PREFIX,
    TASK_STREAM,
    ensure_streams,
    history_subject,
    queue_consumer,
    replicas,
    runs_subject,
)
from ._tasks import DEFAULT_ACK_WAIT, Task, TaskPuller, decode_task, enqueue, ensure_consumer
from ._timers import Timer, schedule
from ._triggers import (
    EventRecord,
    TriggerDeclaration,
    check_event_name,
    declarations,
    declare,
    emit,
    recent_events,
)
from ._wake import wake_subject

__all__ = [
    "CANCEL",
    "CLOSED_STATUSES",
    "CONTROL",
    "DEFAULT_ACK_WAIT",
    "DEFAULT_WORKER_PORT",
    "DISPATCHER",
    "EXECUTIONS",
    "FENCED",
    "HISTORY_PREFIX",
    "HISTORY_STREAM",
    "NO_RETRY",
    "OVERLAP_POLICIES",
    "RUNS_HELD",
    "RUNS_STREAM",
    "SIGNALS_DELIVERED",
    "SIGNALS_REJECTED",
    "STEPS",
    "STEP_RETRIES",
    "TAKEOVERS",
    "TASK_LAG",
    "TASK_PREFIX",
    "TASK_STREAM",
    "TERMINATE",
    "TRANSIENT",
    "AesGcmCodec",
    "AppendConflict",
    "BadSignal",
    "Connection",
    "ConnectionRefused",
    "EmbeddedServer",
    "ErrorInfo",
    "EventRecord",
    "History",
    "HistoryStore",
    "InvalidInput",
    "Lease",
    "Leases",
    "MissingKey",
    "NatflowError",
    "NonDeterminismError",
    "PayloadCodec",
    "PermissionDenied",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunIndex",
    "RunInfo",
    "RunNotFound",
    "Runs",
    "ScheduleFire",
    "ScheduleInfo",
    "ScheduleSpec",
    "Schedules",
    "ServerUnavailable",
    "SignalTimeout",
    "StepError",
    "StepInfo",
    "StepTimeout",
    "Task",
    "TaskPuller",
    "Timer",
    "TriggerDeclaration",
    "WorkerInfo",
    "add_metrics_options",
    "announce",
    "check_event_name",
    "check_queue",
    "check_run_id",
    "check_spec",
    "check_step_name",
    "check_token",
    "check_workflow_name",
    "connect",
    "connect_options",
    "connected_user",
    "declarations",
    "declare",
    "decode_task",
    "decode_value",
    "default_url",
    "emit",
    "encode_value",
    "enqueue",
    "ensure_consumer",
    "ensure_streams",
    "error_info",
    "events",
    "fields",
    "fold_run",
    "history_subject",
    "last_signal_seq",
    "new_run_id",
    "open_event",
    "open_events",
    "open_sealed",
    "parse",
    "pending_signals",
    "ping_subject",
    "prepare_worker",
    "queue_consumer",
    "recent_events",
    "redact_url",
    "replicas",
    "request_start",
    "run_created_at",
    "runs_subject",
    "safe_identity",
    "schedule",
    "seal",
    "sealed_key",
    "send",
    "sequence",
    "serve_metrics",
    "step_attempt",
    "stored_at",
    "to_seconds",
    "wake_subject",
    "withdraw",
    "wrap",
]
