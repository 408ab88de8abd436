"""natflow: durable workflows as plain async Python, on NATS JetStream.

Example::

    from natflow import Client, Worker, WorkflowContext, workflow

    @workflow
    async def greet(ctx: WorkflowContext, input: dict) -> dict:
        text = await ctx.step("hello", lambda name: f"Hello, {name}!", input["name"])
        return {"greeting": text}

    async with await Client.connect() as client:
        async with Worker(client, workflows=[greet]):
            handle = await client.start(greet, {"name": "Ada"})
            print(await handle.result())
"""

from natflow_engine import (
    AesGcmCodec,
    ConnectionRefused,
    ErrorInfo,
    InvalidInput,
    LifecycleEvent,
    MissingKey,
    NatflowError,
    NonDeterminismError,
    PayloadCodec,
    PermissionDenied,
    RateLimit,
    RetryPolicy,
    RunCancelled,
    RunFailed,
    RunInfo,
    RunNotFound,
    RunOutcome,
    ScheduleFire,
    ScheduleInfo,
    ScheduleSpec,
    ServerUnavailable,
    SignalTimeout,
    StepError,
    StepInfo,
    StepTimeout,
)

from . import events
from ._client import Client
from ._context import WorkflowContext
from ._handle import RunHandle
from ._limit import Limit
from ._schedules import ScheduleClient
from ._sites import SiteClient
from ._worker import Worker
from ._workflow import Debounce, Workflow, workflow
from .testing import Replayer, ReplayResult

__all__ = [
    "AesGcmCodec",
    "Client",
    "ConnectionRefused",
    "Debounce",
    "ErrorInfo",
    "InvalidInput",
    "LifecycleEvent",
    "Limit",
    "MissingKey",
    "NatflowError",
    "NonDeterminismError",
    "PayloadCodec",
    "PermissionDenied",
    "RateLimit",
    "ReplayResult",
    "Replayer",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunInfo",
    "RunNotFound",
    "RunOutcome",
    "ScheduleClient",
    "ScheduleFire",
    "ScheduleInfo",
    "ScheduleSpec",
    "ServerUnavailable",
    "SignalTimeout",
    "SiteClient",
    "StepError",
    "StepInfo",
    "StepTimeout",
    "Worker",
    "Workflow",
    "WorkflowContext",
    "events",
    "workflow",
]
