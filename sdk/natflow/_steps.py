"""Running step bodies on the worker: threads for sync functions, retries, timeouts."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectSendStream
from natflow_engine import (
    Connection,
    InvalidInput,
    StepTimeout,
    check_value_size,
    encode_value,
    error_info,
    step_attempt,
)
from natflow_engine.events import utcnow

from . import _tracing as tracing
from ._commands import Finished, Item, StepCommand, StillRunning

log = logging.getLogger("natflow.worker")

# A step still running after this long gets a step_started event, so `natflow runs show`
# can say what a run is doing; fast steps cost one append (their completion) and no more.
STARTED_NOTICE_AFTER = 0.5


@dataclass
class StepRuntime:
    """What a worker lends its runs: the step concurrency limits."""

    limiter: anyio.CapacityLimiter | None = None
    thread_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(64))


def return_type(fn: Callable[..., Any]) -> Any:
    """The annotated return type if it is a Struct or dataclass (results decode into it)."""
    try:
        return _return_type_cached(fn)
    except TypeError:  # an unhashable callable: look it up each time
        return _return_type(fn)


@functools.lru_cache(maxsize=4096)
def _return_type_cached(fn: Callable[..., Any]) -> Any:
    return _return_type(fn)


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:  # unresolvable annotations: results stay plain JSON
        return Any
    hint = hints.get("return", Any)
    if isinstance(hint, type) and (
        issubclass(hint, msgspec.Struct) or hasattr(hint, "__dataclass_fields__")
    ):
        return hint
    return Any


async def run_step(
    command: StepCommand,
    send: MemoryObjectSendStream[Item],
    conn: Connection,
    runtime: StepRuntime,
    run_id: str,
) -> None:
    """Run one attempt of a step and send its outcome to the driver.

    A failed attempt that the step's retry policy retries comes back with ``retry_at``: the
    driver records it and waits for that time on a durable timer, not here, so a crash during
    the backoff neither forgets the attempt nor starts the next one early.
    """
    attempt = command.attempt
    started_at = utcnow()
    notice = asyncio.get_running_loop().call_later(
        STARTED_NOTICE_AFTER, send.send_nowait, StillRunning(command, attempt)
    )
    try:
        with tracing.step_attempt(run_id, command, attempt):
            value = await _invoke(command, runtime, attempt)
    except Exception as exc:
        retry_at = None
        if attempt < command.retry.max_attempts and command.retry.retryable(exc):
            retry_at = utcnow() + timedelta(seconds=command.retry.delay(attempt))
        send.send_nowait(
            Finished(command, attempt, started_at, error=error_info(exc), retry_at=retry_at)
        )
        return
    finally:
        notice.cancel()
    try:
        data = encode_value(f"result of step {command.name!r}", value)
        check_value_size(conn, f"result of step {command.name!r}", len(data), to_seal=True)
    except InvalidInput as exc:
        send.send_nowait(Finished(command, attempt, started_at, error=error_info(exc)))
        return
    send.send_nowait(Finished(command, attempt, started_at, result=data))


async def _invoke(command: StepCommand, runtime: StepRuntime, attempt: int) -> Any:
    if runtime.limiter is not None:
        async with runtime.limiter:
            return await _call(command, runtime, attempt)
    return await _call(command, runtime, attempt)


async def _call(command: StepCommand, runtime: StepRuntime, attempt: int) -> Any:
    with step_attempt(command.workflow, command.name, command.issued_at):
        if command.timeout is None:
            return await _call_once(command, runtime)
        with anyio.move_on_after(command.timeout):
            return await _call_once(command, runtime)
        # The deadline passed: say which step and attempt, not an empty TimeoutError.
        raise StepTimeout(command.name, attempt, command.timeout)


async def _call_once(command: StepCommand, runtime: StepRuntime) -> Any:
    fn = command.fn
    if inspect.iscoroutinefunction(fn):
        return await fn(*command.args, **command.kwargs)
    result = await anyio.to_thread.run_sync(
        functools.partial(fn, *command.args, **command.kwargs),
        abandon_on_cancel=command.timeout is not None,
        limiter=runtime.thread_limiter,
    )
    if inspect.isawaitable(result):
        return await result
    return result
