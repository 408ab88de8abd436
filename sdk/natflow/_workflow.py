"""``@workflow``: turns an async function into a workflow definition, checked on the spot."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, overload

from natflow_engine import (
    InvalidInput,
    RateLimit,
    RetryPolicy,
    ScheduleSpec,
    check_event_name,
    check_field_path,
    check_queue,
    check_spec,
    check_workflow_name,
    declared_schedule_id,
    to_seconds,
)

from ._context import WorkflowContext
from ._keys import check_key_fields
from ._limit import BoundLimit, Limit, bind_limits

WorkflowFn = Callable[..., Awaitable[Any]]

DEFAULT_QUEUE = "default"
# Steps of one run that execute at once (more wait their turn, in order of issue): a fan-out
# of thousands cannot flood its worker, and fan-outs of up to this many run as before.
DEFAULT_MAX_PARALLEL_STEPS = 100
KeySpec = str | Callable[[Any], object]  # an input field's name, or a function of the input


@dataclass(frozen=True)
class Debounce:
    """``@workflow(debounce=Debounce(window, key=...))``: starts within ``window`` seconds
    of the first one collapse into one run, which gets the last start's input.

    ``key`` (an input field's name, or a callable taking the input) keeps one window per key
    value; without it the workflow has one window. See README "Flow control".
    """

    window: float | timedelta
    key: KeySpec | None = None

    def __post_init__(self) -> None:
        seconds = to_seconds("debounce window", self.window)
        if seconds <= 0:
            raise InvalidInput("debounce window must be positive seconds or a timedelta")
        object.__setattr__(self, "window", seconds)
        _check_key("debounce key", self.key)

    @property
    def seconds(self) -> float:
        assert isinstance(self.window, float | int)
        return float(self.window)


def _check_key(what: str, key: object) -> None:
    if key is not None and not isinstance(key, str) and not callable(key):
        raise InvalidInput(f"{what} must be an input field's name or a callable, not {key!r}")
    if isinstance(key, str):
        check_field_path(what, key)


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
    schedule: ScheduleSpec | None = None  # from cron=/every=: the worker keeps it in place
    on_event: tuple[str, ...] = ()  # events that start a run of this workflow

    @property
    def schedule_id(self) -> str:
        """The id of the schedule ``cron=``/``every=`` declares (see declared_schedule_id)."""
        return declared_schedule_id(self.name)

    retention: float | None = None  # seconds its closed runs are kept (None: the engine's)
    # Flow control (README "Flow control"); none of it costs an unlimited workflow anything.
    max_parallel_steps: int | None = DEFAULT_MAX_PARALLEL_STEPS
    rate_limit: RateLimit | None = None  # starts over the rate are delayed, not refused
    singleton: KeySpec | None = None  # "" = one open run per workflow
    debounce: Debounce | None = None

    @property
    def flow_controlled(self) -> bool:
        """Whether a start needs more than the plain conditional create."""
        return (
            self.rate_limit is not None or self.singleton is not None or self.debounce is not None
        )

    limits: tuple[BoundLimit, ...] = ()  # concurrency limits, in the order slots are taken
    priority: int = 0  # default priority of its runs among those waiting for a slot

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
    cron: str | None = None,
    every: float | timedelta | None = None,
    timezone: str = "UTC",
    on_event: str | tuple[str, ...] | list[str] = (),
    retention: float | timedelta | None = None,
    max_parallel_steps: int | None = DEFAULT_MAX_PARALLEL_STEPS,
    rate_limit: RateLimit | None = None,
    singleton: bool | KeySpec = False,
    debounce: float | timedelta | Debounce | None = None,
    concurrency: Limit | Sequence[Limit] | None = None,
    priority: int = 0,
) -> Callable[[WorkflowFn], Workflow]: ...


def workflow(
    fn: WorkflowFn | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    retry: RetryPolicy | None = None,
    cron: str | None = None,
    every: float | timedelta | None = None,
    timezone: str = "UTC",
    on_event: str | tuple[str, ...] | list[str] = (),
    retention: float | timedelta | None = None,
    max_parallel_steps: int | None = DEFAULT_MAX_PARALLEL_STEPS,
    rate_limit: RateLimit | None = None,
    singleton: bool | KeySpec = False,
    debounce: float | timedelta | Debounce | None = None,
    concurrency: Limit | Sequence[Limit] | None = None,
    priority: int = 0,
) -> Workflow | Callable[[WorkflowFn], Workflow]:
    """Declare a workflow.

    Example::

        @workflow
        async def greet(ctx: WorkflowContext, input: dict) -> dict:
            text = await ctx.step("hello", say_hello, input["name"])
            return {"greeting": text}

        @workflow(name="order", queue="payments", retry=RetryPolicy(max_attempts=5))
        async def order(ctx: WorkflowContext, input: OrderInput) -> Receipt: ...

        @workflow(cron="0 2 * * *", timezone="Europe/Berlin")
        async def nightly(ctx: WorkflowContext) -> None: ...

        @workflow(on_event="order.created")
        async def fulfil(ctx: WorkflowContext, order: Order) -> None: ...

    The input is decoded into the second parameter's annotation (a msgspec Struct, a
    dataclass, or JSON types); ``retry`` is the default retry policy of the workflow's steps.
    ``cron`` (or ``every``, in seconds) declares a schedule, id = the workflow's name, that
    every worker serving the workflow creates or updates when it starts. ``on_event`` names
    events (``natflow.event.<name>``) that each start one run, the event's body as input.
    ``retention`` (seconds or a timedelta) is how long its runs are kept once closed,
    overriding the engine's ``--retention`` (runs started by ``Client.start``).

    Flow control (README "Flow control"): ``max_parallel_steps`` bounds how many of a run's
    steps execute at once (default 100; ``None``: only the worker's ``max_concurrent_steps``);
    ``rate_limit`` delays starts beyond a :class:`RateLimit`; ``singleton`` (``True``, or an
    input field's name or a callable for one per key) keeps at most one open run, a start
    returning the open run's handle; ``debounce`` (seconds, or a :class:`Debounce` with a key)
    collapses starts within a window into one run with the last input.
    ``concurrency`` (a :class:`Limit` or a list of them) bounds how many of its runs
    execute at once across every worker; ``priority`` is its runs' default priority among
    those waiting for a slot (higher first; ``client.start(priority=...)`` overrides it).
    """
    keep = None if retention is None else to_seconds("retention", retention)
    flow = _flow_options(max_parallel_steps, rate_limit, singleton, debounce)
    check_priority(priority)

    def decorate(f: WorkflowFn) -> Workflow:
        wf = _define(f, name=name, queue=queue, retry=retry, retention=keep)
        defined = dataclasses.replace(
            wf,
            schedule=_schedule(cron, every, timezone, queue),
            on_event=_events(on_event),
            **flow,
            limits=bind_limits(concurrency, wf.name),
            priority=priority,
        )
        check_key_fields(
            defined.name,
            defined.input_type,
            limits=defined.limits,
            rate_limit=defined.rate_limit,
            debounce_key=None if defined.debounce is None else defined.debounce.key,
            singleton=defined.singleton,
        )
        return defined

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


def check_priority(priority: object) -> int:
    """A run's priority: a whole number (higher goes first), else :class:`InvalidInput`."""
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 2**31:
        raise InvalidInput(f"priority must be a whole number (higher first), not {priority!r}")
    return priority


def _schedule(
    cron: str | None, every: float | timedelta | None, timezone: str, queue: str
) -> ScheduleSpec | None:
    if cron is None and every is None:
        return None
    return check_spec(
        ScheduleSpec(
            cron=cron,
            every=None if every is None else to_seconds("every", every),
            timezone=timezone,
            queue=queue,
        )
    )


def _flow_options(
    max_parallel_steps: int | None,
    rate_limit: RateLimit | None,
    singleton: bool | KeySpec,
    debounce: float | timedelta | Debounce | None,
) -> dict[str, Any]:
    if max_parallel_steps is not None and (
        isinstance(max_parallel_steps, bool)
        or not isinstance(max_parallel_steps, int)
        or max_parallel_steps < 1
    ):
        raise InvalidInput(
            f"max_parallel_steps must be a positive int (or None), not {max_parallel_steps!r}"
        )
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise InvalidInput(f"rate_limit must be a RateLimit, not {rate_limit!r}")
    key: KeySpec | None = None
    if singleton is True:
        key = ""
    elif singleton is not False:
        _check_key("singleton", singleton)
        key = singleton
    if debounce is not None and not isinstance(debounce, Debounce):
        debounce = Debounce(debounce)
    if key is not None and debounce is not None:
        raise InvalidInput(
            "a workflow is either singleton or debounced, not both: a debounced workflow "
            "already has at most one pending run per key"
        )
    return {
        "max_parallel_steps": max_parallel_steps,
        "rate_limit": rate_limit,
        "singleton": key,
        "debounce": debounce,
    }


def _events(on_event: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    names = (on_event,) if isinstance(on_event, str) else tuple(on_event)
    return tuple(check_event_name(name) for name in names)
