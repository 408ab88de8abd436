"""natflow's durable core: event schema, streams, history store, task queue, engine services.

Applications import :mod:`sdk`; this package is what the SDK, the engine services and the
``natflow`` command line are built on.
"""

from ._connection import Connection, connect, default_url, wrap
from ._durations import to_seconds
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
from ._retry import RetryPolicy
from ._state import RunInfo, StepInfo

__all__ = [
    "Connection",
    "ErrorInfo",
    "InvalidInput",
    "NatflowError",
    "NonDeterminismError",
    "PermissionDenied",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunInfo",
    "RunNotFound",
    "ServerUnavailable",
    "SignalTimeout",
    "StepError",
    "StepInfo",
    "connect",
    "default_url",
    "to_seconds",
    "wrap",
]
