"""``@workflow``: turns an async function into a workflow definition, checked on the spot."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, overload

from natflow_engine import InvalidInput, RetryPolicy, check_queue, check_workflow_name, to_seconds

if TYPE_CHECKING:
    from ._context import WorkflowContext

WorkflowFn = Callable[..., Awaitable[Any]]

DEFAULT_QUEUE = "default"


@dataclass(frozen=True)
class Workflow:
    """A workflow definition: what ``@workflow`` returns and what ``client.start`` takes."""

    name: str
    queue: str
    fn: WorkflowFn
    retry: RetryPolicy | None
    input_type: Any
    result_type: Any
    takes_input: bool
    retention: float | None = None  # seconds its closed runs are kept (None: the engine's)

    async def __call__(self, ctx: WorkflowContext, input: Any = None) -> Any:
        if self.takes_input:
            return await self.fn(ctx, input)
        return await self.fn(ctx)


@overload
def workflow(fn: WorkflowFn, /) -> Workflow: ...


@overload
def workflow(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retry: RetryPolicy | None = None,
    retention: float | timedelta | None = None,
) -> Callable[[WorkflowFn], Workflow]: ...


def workflow(
    fn: WorkflowFn | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retry: RetryPolicy | None = None,
    retention: float | timedelta | None = None,
) -> Workflow | Callable[[WorkflowFn], Workflow]:
    """Declare a workflow.

    Example::

        @workflow
        async def greet(ctx: WorkflowContext, input: dict) -> dict:
            text = await ctx.step("hello", say_hello, input["name"])
            return {"greeting": text}

        @workflow(name="order", queue="payments", retry=RetryPolicy(max_attempts=5))
        async def order(ctx: WorkflowContext, input: OrderInput) -> Receipt: ...

    The input is decoded into the second parameter's annotation (a msgspec Struct, a
    dataclass, or JSON types); ``retry`` is the default retry policy of the workflow's steps;
    ``retention`` (seconds or a timedelta) how long its runs are kept once closed, overriding
    the engine's ``--retention``.
    """
    keep = None if retention is None else to_seconds("retention", retention)

    def decorate(f: WorkflowFn) -> Workflow:
        return _define(f, name=name, queue=queue, retry=retry, retention=keep)

    if fn is not None:
        return decorate(fn)
    return decorate


def _define(
    fn: WorkflowFn,
    *,
    name: str | None,
    queue: str,
    retry: RetryPolicy | None,
    retention: float | None = None,
) -> Workflow:
    if isinstance(fn, Workflow):
        raise InvalidInput(f"{fn.name!r} is already a workflow; apply @workflow once")
    if not inspect.iscoroutinefunction(fn):
        raise InvalidInput(
            f"@workflow needs an `async def` function; {getattr(fn, '__name__', fn)!r} is not "
            f"one. Write `async def {getattr(fn, '__name__', 'name')}(ctx, input): ...`"
        )
    wf_name = check_workflow_name(name if name is not None else fn.__name__)
    check_queue(queue)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidInput(f"retry must be a RetryPolicy, not {type(retry).__name__}")
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not 1 <= len(params) <= 2:
        raise InvalidInput(
            f"workflow {wf_name!r} must take (ctx) or (ctx, input), "
            f"not {len(params)} positional parameters"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # unresolvable forward reference: name it instead of guessing
        raise InvalidInput(
            f"cannot resolve the annotations of workflow {wf_name!r}: {exc}; define the input "
            f"type at module level before the workflow"
        ) from exc
    input_type = hints.get(params[1].name, Any) if len(params) == 2 else Any
    return Workflow(
        name=wf_name,
        queue=queue,
        fn=fn,
        retry=retry,
        input_type=input_type,
        result_type=hints.get("return", Any),
        takes_input=len(params) == 2,
        retention=retention,
    )
