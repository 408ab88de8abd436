"""``WorkflowContext``: everything a workflow may do that must survive a replay."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

from engine import RetryPolicy

if TYPE_CHECKING:
    from ._execution import RunExecution

T = TypeVar("T")


class _ReplayAwareLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Drops records while the workflow replays, so no line is logged twice."""

    def __init__(self, execution: RunExecution) -> None:
        super().__init__(
            logging.getLogger(f"natflow.workflow.{execution.workflow.name}"),
            {"run_id": execution.run_id, "workflow": execution.workflow.name},
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

    def __init__(self, execution: RunExecution) -> None:
        self._execution = execution
        self._random = random.Random(execution.seed)
        self._logger = _ReplayAwareLogger(execution)

    @property
    def run_id(self) -> str:
        return self._execution.run_id

    @property
    def workflow_name(self) -> str:
        return self._execution.workflow.name

    @property
    def is_replaying(self) -> bool:
        """True while the code re-runs what history already recorded."""
        return self._execution.replaying

    @property
    def logger(self) -> logging.LoggerAdapter:  # type: ignore[type-arg]
        """A logger that drops records while replaying."""
        return self._logger

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    @overload
    async def step(
        self,
        name: str,
        fn: Callable[..., T],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on this worker and record its result durably.

        On replay the recorded result comes back without calling ``fn``; a recorded error is
        raised as :class:`StepError`. Sync functions run in a worker thread. ``timeout``
        bounds one attempt; ``retry`` overrides the workflow's default policy.
        """
        return await self._execution.issue_step(name, fn, args, kwargs, retry, timeout)

    async def parallel(self, *awaitables: Awaitable[Any]) -> list[Any]:
        """Run steps (or any workflow awaitables) concurrently; results in argument order."""
        return list(await asyncio.gather(*awaitables))

    def now(self) -> datetime:
        """Deterministic time: when the latest event this run has seen was recorded (UTC)."""
        return self._execution.now

    def random(self) -> random.Random:
        """A ``random.Random`` seeded per run: the same numbers on every replay."""
        return self._random

    def uuid4(self) -> uuid.UUID:
        """A random UUID that is the same on every replay."""
        return uuid.UUID(int=self._random.getrandbits(128), version=4)

    def patched(self, change_id: str) -> bool:
        """Versioning: True for runs that reach this point with the change deployed.

        Example::

            if ctx.patched("send-sms"):
                await ctx.step("sms", send_sms, user)
        """
        return self._execution.patched(change_id)
