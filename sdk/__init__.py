"""natflow SDK: durable workflows as plain async Python, on NATS JetStream.

Example::

    from sdk import Client, Worker, WorkflowContext, workflow

    @workflow
    async def greet(ctx: WorkflowContext, input: dict) -> dict:
        text = await ctx.step("hello", lambda name: f"Hello, {name}!", input["name"])
        return {"greeting": text}

    async with await Client.connect() as client:
        async with Worker(client, workflows=[greet]):
            handle = await client.start(greet, {"name": "Ada"})
            print(await handle.result())
"""

from engine import (
    ErrorInfo,
    InvalidInput,
    NatflowError,
    NonDeterminismError,
    RetryPolicy,
    RunCancelled,
    RunFailed,
    RunInfo,
    RunNotFound,
    SignalTimeout,
    StepError,
    StepInfo,
)

from ._client import Client, RunHandle
from ._context import WorkflowContext
from ._worker import Worker
from ._workflow import Workflow, workflow

__all__ = [
    "Client",
    "ErrorInfo",
    "InvalidInput",
    "NatflowError",
    "NonDeterminismError",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunHandle",
    "RunInfo",
    "RunNotFound",
    "SignalTimeout",
    "StepError",
    "StepInfo",
    "Worker",
    "Workflow",
    "WorkflowContext",
    "workflow",
]
