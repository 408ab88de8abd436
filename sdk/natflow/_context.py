"""``WorkflowContext``: everything a workflow may do that must survive a replay."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, Protocol, TypeVar, overload

from natflow_engine import (
    InvalidInput,
    RateLimit,
    RetryPolicy,
    check_run_id,
    check_step_name,
    decode_value,
    encode_value,
    to_seconds,
)
from natflow_engine.events import utcnow

T = TypeVar("T")


class WorkflowRuntime(Protocol):
    """What a :class:`WorkflowContext` asks of the run it belongs to.

    The replay core (``natflow._replay.WorkflowState``) implements it: each ``issue_*`` call
    becomes a command at the next position, matched against history, and its future is
    resolved when history (recorded or live) delivers the outcome.
    """

    @property
    def run_id(self) -> str: ...

    @property
    def workflow_name(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def now(self) -> datetime: ...

    @property
    def replaying(self) -> bool: ...

    def issue_step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
        rate: tuple[RateLimit, str | None] | None = None,
    ) -> asyncio.Future[Any]: ...

    def issue_sleep(self, name: str, due_at: datetime) -> asyncio.Future[Any]: ...

    def issue_wait(self, name: str, timeout: float | None) -> asyncio.Future[Any]: ...

    def issue_child(
        self,
        name: str,
        input_json: bytes,
        run_id: str | None,
        queue: str,
        parent_close: str,
        result_type: Any,
    ) -> asyncio.Future[Any]: ...

    def patched(self, change_id: str) -> bool: ...

    @property
    def continue_as_new_suggested(self) -> bool: ...

    def continue_as_new(self, value: Any) -> NoReturn: ...


class ChildWorkflow(Protocol):
    """What :meth:`WorkflowContext.child` reads of a ``@workflow`` definition
    (``natflow.Workflow``), described here because the definitions' module imports this one.
    """

    @property
    def name(self) -> str: ...

    @property
    def queue(self) -> str: ...

    @property
    def fn(self) -> Callable[..., Awaitable[Any]]: ...

    @property
    def input_type(self) -> Any: ...

    @property
    def result_type(self) -> Any: ...

    @property
    def takes_input(self) -> bool: ...


def _step_rate(
    name: str, rate_limit: RateLimit | None, rate_key: str | None
) -> tuple[RateLimit, str | None]:
    if not isinstance(rate_limit, RateLimit):
        raise InvalidInput(
            f"step {name!r}: rate_limit must be a RateLimit (rate_key needs one), "
            f"not {rate_limit!r}"
        )
    if rate_key is not None and not isinstance(rate_key, str):
        raise InvalidInput(f"step {name!r}: rate_key must be a str, not {rate_key!r}")
    return rate_limit, rate_key


class _ReplayAwareLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Drops records while the workflow replays, so no line is logged twice."""

    def __init__(self, execution: WorkflowRuntime) -> None:
        super().__init__(
            logging.getLogger(f"natflow.workflow.{execution.workflow_name}"),
            {"run_id": execution.run_id, "workflow": execution.workflow_name},
        )
        self._execution = execution

    def isEnabledFor(self, level: int) -> bool:
        return not self._execution.replaying and super().isEnabledFor(level)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return f"[{self._execution.run_id}] {msg}", kwargs


class WorkflowContext:
    """The workflow's handle on durable execution. Passed as the first argument.

    Example::

        @workflow
        async def order(ctx: WorkflowContext, input: OrderInput) -> Receipt:
            payment = await ctx.step("charge", charge_card, input.total)
            user, orders = await ctx.parallel(
                ctx.step("user", fetch_user, input.user_id),
                ctx.step("orders", fetch_orders, input.user_id),
            )
            return Receipt(order_id=payment["id"])
    """

    def __init__(self, execution: WorkflowRuntime) -> None:
        self._execution = execution
        # Made when first asked for: most workflows use neither, and seeding a Random and
        # making a logger adapter cost ~15 us a run. Created later, the same numbers follow.
        self._random: random.Random | None = None
        self._logger: _ReplayAwareLogger | None = None

    @property
    def run_id(self) -> str:
        return self._execution.run_id

    @property
    def workflow_name(self) -> str:
        return self._execution.workflow_name

    @property
    def is_replaying(self) -> bool:
        """True while the code re-runs what history already recorded.

        Replay ends exactly where recorded history does, whatever it recorded last (a step,
        sleep, signal wait, patch marker or cancel); a brand-new run is never replaying.
        """
        return self._execution.replaying

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger that drops records while replaying."""
        if self._logger is None:
            self._logger = _ReplayAwareLogger(self._execution)
        return self._logger

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: RateLimit | None = None,
        rate_key: str | None = None,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: RateLimit | None = None,
        rate_key: str | None = None,
        **kwargs: Any,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        rate_limit: RateLimit | None = None,
        rate_key: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on this worker and record its result durably.

        ``name`` and ``fn`` are positional only, so ``fn`` may take keywords of those names
        (``ctx.step("hello", say_hello, name="Ada")``).

        On replay the recorded result comes back without calling ``fn``; a recorded error is
        raised as :class:`StepError`. Sync functions run in a worker thread. ``timeout``
        bounds one attempt; ``retry`` overrides the workflow's default policy.
        ``rate_limit`` (a :class:`RateLimit`, shared by every step and worker naming it) makes
        each attempt wait for a slot of that limit (per ``rate_key`` if given) before it runs.
        """
        rate = None
        if rate_limit is not None or rate_key is not None:
            rate = _step_rate(name, rate_limit, rate_key)
        return await self._execution.issue_step(name, fn, args, kwargs, retry, timeout, rate)

    async def sleep(self, name: str, duration: float | timedelta) -> None:
        """Durable sleep: survives restarts of workers, engine and server; holds no worker.

        Example::

            await ctx.sleep("follow-up", timedelta(hours=24))
        """
        seconds = to_seconds(f"duration of sleep {name!r}", duration)
        await self._execution.issue_sleep(name, utcnow() + timedelta(seconds=seconds))

    async def sleep_until(self, name: str, when: datetime) -> None:
        """Durable sleep until an aware datetime (a time in the past returns at once)."""
        if not isinstance(when, datetime) or when.tzinfo is None:
            raise InvalidInput(
                f"sleep_until {name!r} needs an aware datetime (with a timezone), not {when!r}"
            )
        try:
            # Stored in UTC: a time near datetime.max west of UTC (or min east of it) has
            # no UTC value, and every later reading of the run (describe, cancel, the
            # engine's fold) failed on it, leaving a run nothing could stop.
            due = when.astimezone(UTC)
        except OverflowError:
            raise InvalidInput(
                f"sleep_until {name!r}: {when.isoformat()} has no UTC time (it lies past the "
                f"last or before the first datetime); to wait for good, wait for a signal"
            ) from None
        await self._execution.issue_sleep(name, due)

    async def wait_for_signal(self, name: str, timeout: float | timedelta | None = None) -> Any:
        """The payload of the next signal called ``name``, including one sent earlier.

        Several signals of a name are delivered one per wait, in order of arrival. Raises
        :class:`SignalTimeout` when ``timeout`` passes first.

        Example::

            approval = await ctx.wait_for_signal("approved", timeout=timedelta(hours=48))
        """
        seconds = None if timeout is None else to_seconds(f"timeout of signal {name!r}", timeout)
        return await self._execution.issue_wait(name, seconds)

    async def child(
        self,
        workflow: ChildWorkflow | str,
        input: Any = None,
        *,
        run_id: str | None = None,
        queue: str | None = None,
        parent_close: str = "cancel",
    ) -> Any:
        """Start a child run and return its result; started exactly once, however often this
        run replays or its worker dies.

        The child's id is ``run_id`` or ``<this run's id>-c<position>``. Raises
        :class:`RunFailed` if the child fails, :class:`RunCancelled` if it is cancelled or
        terminated. ``parent_close`` (``"cancel"``, ``"terminate"`` or ``"abandon"``) says
        what happens to the child if this run closes (or is cancelled) first.

        Example::

            receipt = await ctx.child(charge, ChargeInput(total=10), queue="payments")
        """
        if isinstance(workflow, str):
            name, default_queue, result_type = workflow, "default", Any
        elif hasattr(workflow, "fn") and hasattr(workflow, "name"):
            name, default_queue, result_type = workflow.name, workflow.queue, workflow.result_type
        else:
            raise InvalidInput(f"ctx.child takes a @workflow or its name, not {workflow!r}")
        if run_id is not None:
            check_run_id(run_id)
        data = encode_value(f"input of child {name!r}", input)
        if not isinstance(workflow, str) and workflow.takes_input:
            decode_value(f"input of child {name!r}", data, workflow.input_type)
        return await self._execution.issue_child(
            name, data, run_id, queue or default_queue, parent_close, result_type
        )

    async def parallel(self, *awaitables: Awaitable[Any]) -> list[Any]:
        """Run steps (or any workflow awaitables) concurrently; results in argument order."""
        for position, item in enumerate(awaitables, 1):
            if inspect.isawaitable(item):
                continue
            given = [*awaitables, *(item if isinstance(item, list | tuple) else ())]
            for other in given:  # never to be awaited: Python warns of each coroutine left
                if inspect.iscoroutine(other):
                    other.close()
            if isinstance(item, list | tuple) and len(awaitables) == 1:
                raise InvalidInput(
                    "ctx.parallel takes awaitables as separate arguments, not a "
                    f"{type(item).__name__}: ctx.parallel(*items)"
                )
            raise InvalidInput(
                f"ctx.parallel: argument {position} is a {type(item).__name__}, not an "
                f"awaitable (a ctx.step(...), ctx.sleep(...), ctx.child(...) call)"
            )
        return list(await asyncio.gather(*awaitables))

    def now(self) -> datetime:
        """Deterministic time: when the latest event this run has seen was recorded (UTC)."""
        return self._execution.now

    def random(self) -> random.Random:
        """A ``random.Random`` seeded per run: the same numbers on every replay."""
        if self._random is None:
            self._random = random.Random(self._execution.seed)
        return self._random

    def uuid4(self) -> uuid.UUID:
        """A random UUID that is the same on every replay."""
        return uuid.UUID(int=self.random().getrandbits(128), version=4)

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this stretch of the run's history and go on with a fresh one and ``input``.

        Raises (never returns): the workflow starts again from its beginning with ``input``,
        under the same run id, so the handle a client holds, signals sent to the run and its
        index entry keep working; ``result()`` returns the result of the last stretch.
        History holds only the current stretch (``describe().stretch`` counts them). Signals
        that reached the run and that the workflow has not taken yet are delivered in the new
        stretch; pending sleeps and signal waits are dropped; open children get their
        ``parent_close`` policy. ``input`` must be what the workflow takes
        (:class:`~natflow.InvalidInput` at this call, naming the problem, if not).

        Example::

            @workflow
            async def loop(ctx: WorkflowContext, n: int) -> int:
                while n < 1_000_000:
                    n = await ctx.step("tick", tick, n)
                    if ctx.continue_as_new_suggested:
                        ctx.continue_as_new(n)
                return n
        """
        self._execution.continue_as_new(input)

    @property
    def continue_as_new_suggested(self) -> bool:
        """True once this stretch of history is long enough that continuing as new is
        recommended: after 1,000 commands (steps, sleeps, signal waits, children) in the
        stretch. Deterministic: every replay answers alike at the same point."""
        return self._execution.continue_as_new_suggested

    def patched(self, change_id: str) -> bool:
        """Versioning: True for runs that reach this point with the change deployed.

        False while replaying history recorded without the change (old runs keep the old
        path); True, and recorded, for runs that reach it live.

        Example::

            if ctx.patched("send-sms"):
                await ctx.step("sms", send_sms, user)
        """
        # Recorded in history: a name as a step's (an int, or 2 MB, made the run unreadable).
        return self._execution.patched(check_step_name(change_id))
