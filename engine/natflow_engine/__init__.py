"""natflow's durable core: event schema, streams, history store, task queue, engine services.

Applications import :mod:`natflow`; this package is what the SDK, the engine services and the
``natflow`` command line are built on. Its names below are the engine's face: the SDK imports
only these (and the public :mod:`natflow_engine.events` schema), never a private module, and
nothing here imports the SDK (``tests/test_layout.py`` checks both).
"""

from . import events
from ._cli import add_metrics_options, connect_options
from ._codec import decode_value, encode_value, error_info
from ._completion import RunOutcome
from ._connection import TRANSIENT, Connection, connect, default_url, wrap
from ._durations import parse_duration, to_seconds
from ._engine import DISPATCHER
from ._errors import (
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
)
from ._history import AppendConflict, History, HistoryStore
from ._index import RunIndex
from ._leases import Lease, Leases
from ._lifecycle import (
    LIFECYCLE_STREAM,
    LifecycleEvent,
    decode_lifecycle,
    lifecycle_filter,
    lifecycle_subject,
    workflow_token,
)
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
from ._queues import queue_paused
from ._registry import WorkerInfo, announce, ping_subject, safe_identity, withdraw
from ._restart import restart_run
from ._retention import delete_run
from ._retry import NO_RETRY, RetryPolicy
from ._runs import Runs
from ._server import EmbeddedServer
from ._signals import (
    CANCEL,
    CONTROL,
    PAUSE,
    RESUME,
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
    "LIFECYCLE_STREAM",
    "NO_RETRY",
    "PAUSE",
    "RESUME",
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
    "AppendConflict",
    "BadSignal",
    "Connection",
    "EmbeddedServer",
    "ErrorInfo",
    "History",
    "HistoryStore",
    "InvalidInput",
    "Lease",
    "Leases",
    "LifecycleEvent",
    "NatflowError",
    "NonDeterminismError",
    "PermissionDenied",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunIndex",
    "RunInfo",
    "RunNotFound",
    "RunOutcome",
    "Runs",
    "ServerUnavailable",
    "SignalTimeout",
    "StepError",
    "StepInfo",
    "Task",
    "TaskPuller",
    "Timer",
    "WorkerInfo",
    "add_metrics_options",
    "announce",
    "check_queue",
    "check_run_id",
    "check_step_name",
    "check_token",
    "check_workflow_name",
    "connect",
    "connect_options",
    "decode_lifecycle",
    "decode_task",
    "decode_value",
    "default_url",
    "delete_run",
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
    "lifecycle_filter",
    "lifecycle_subject",
    "parse",
    "parse_duration",
    "pending_signals",
    "ping_subject",
    "prepare_worker",
    "queue_consumer",
    "queue_paused",
    "replicas",
    "restart_run",
    "run_created_at",
    "runs_subject",
    "safe_identity",
    "schedule",
    "send",
    "sequence",
    "serve_metrics",
    "step_attempt",
    "stored_at",
    "to_seconds",
    "wake_subject",
    "withdraw",
    "workflow_token",
    "wrap",
]
