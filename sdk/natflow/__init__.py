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
    ErrorInfo,
    InvalidInput,
    LifecycleEvent,
    NatflowError,
    NonDeterminismError,
    PermissionDenied,
    RetryPolicy,
    RunCancelled,
    RunFailed,
    RunInfo,
    RunNotFound,
    RunOutcome,
    ServerUnavailable,
    SignalTimeout,
    StepError,
    StepInfo,
)

from . import events
from ._client import Client, RunHandle
from ._context import WorkflowContext
from ._worker import Worker
from ._workflow import Workflow, workflow

__all__ = [
    "Client",
    "ErrorInfo",
    "InvalidInput",
    "LifecycleEvent",
    "NatflowError",
    "NonDeterminismError",
    "PermissionDenied",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunInfo",
    "RunNotFound",
    "RunOutcome",
    "ServerUnavailable",
    "SignalTimeout",
    "StepError",
    "StepInfo",
    "Worker",
    "Workflow",
    "WorkflowContext",
    "events",
    "workflow",
]
