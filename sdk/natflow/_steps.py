"""Running step bodies on the worker: threads for sync functions, retries, timeouts."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

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
    reserve,
    step_attempt,
)
from natflow_engine.events import utcnow

from . import _tracing as tracing
from ._commands import Finished, Item, StepCommand, StillRunning

if TYPE_CHECKING:
    from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

# A step still running after this long gets a step_started event, so `natflow runs show`
# can say what a run is doing; fast steps cost one append (their completion) and no more.
STARTED_NOTICE_AFTER = 0.5

# The connection of the worker running the current step: for natflow's own steps (the
# debounce step reads its cell in KV); user steps never see it.
step_connection: ContextVar[Connection] = ContextVar("natflow_step_connection")


@dataclass
class StepRuntime:
    """What a worker lends its runs: the step concurrency limits.

    ``limiter`` bounds the worker's steps (``max_concurrent_steps``); ``run_limiter``, one per
    run, bounds that run's steps (``@workflow(max_parallel_steps=...)``).
    """

    limiter: anyio.CapacityLimiter | None = None
    thread_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(64))
    run_limiter: RunSlots | None = None


class RunSlots:
    """At most ``size`` holders, first come first served; taking a free slot does not yield
    to the event loop (unlike ``anyio.CapacityLimiter``), so a run under its bound pays
    nothing measurable per step."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # handed the slot as it was cancelled
                self.release()
            raise  # (a cancelled turn stays queued; release skips it)

    def release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to the next in line
                return
        self._free += 1


def run_runtime(runtime: StepRuntime, workflow: Workflow) -> StepRuntime:
    """The worker's step runtime plus the run's own step bound (a new limiter per run)."""
    if workflow.max_parallel_steps is None:
        return runtime
    return dataclasses.replace(runtime, run_limiter=RunSlots(workflow.max_parallel_steps))


def rate_fields(item: StillRunning) -> dict[str, Any]:
    """The ``step_started`` fields of a step that waits for a rate limit's slot."""
    if item.rate_limited_until is None or item.command.rate is None:
        return {}
    return {
        "rate_limited_until": item.rate_limited_until,
        "rate_limit": item.command.rate[0].name,
    }


def return_type(fn: Callable[..., Any]) -> Any:
    """The step function's annotated return type, which its recorded result decodes into
    (``Any``: plain JSON): what mypy says the step returns, a ``datetime``, ``Decimal``,
    ``list[Item]`` or ``Item | None`` as much as a Struct (only a bare Struct or dataclass
    was, and the rest came back as strings and dicts). A result that does not fit it reads
    back as plain JSON."""
    try:
        return _return_type_cached(fn)
    except TypeError:  # an unhashable callable: look it up each time
        return _return_type(fn)


@functools.lru_cache(maxsize=4096)
def _return_type_cached(fn: Callable[..., Any]) -> Any:
    return _return_type(fn)


def _return_type(fn: Callable[..., Any]) -> Any:
    while isinstance(fn, functools.partial):  # what it calls is what it returns
        fn = fn.func
    target: Any = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and callable(fn):
        target = type(fn).__call__  # a callable object: its __call__'s annotation
    try:
        hints = inspect.get_annotations(target, eval_str=True)
    except Exception:  # unresolvable annotations: results stay plain JSON
        return Any
    hint = hints.get("return", Any)
    try:
        msgspec.json.Decoder(hint)  # one msgspec can decode into (not a TypeVar, say)
    except TypeError:
        return Any
    return hint


async def run_step(
    command: StepCommand,
    send: MemoryObjectSendStream[Item],
    conn: Connection,
    runtime: StepRuntime,
    run_id: str,
    traced: bool = True,
) -> None:
    """Run one attempt of a step and send its outcome to the driver (``traced``: see
    :func:`natflow._tracing.step_attempt`).

    A failed attempt that the step's retry policy retries comes back with ``retry_at``: the
    driver records it and waits for that time on a durable timer, not here, so a crash during
    the backoff neither forgets the attempt nor starts the next one early.
    """
    slots = runtime.run_limiter
    if slots is not None:  # the run's own bound comes first: a step queued behind it
        await slots.acquire()  # holds no rate slot
    try:
        if command.rate is not None and not await _wait_for_rate(command, send, conn):
            return
        step_connection.set(conn)
        await _run_attempt(command, send, conn, runtime, run_id, traced)
    finally:
        if slots is not None:
            slots.release()


async def _wait_for_rate(
    command: StepCommand, send: MemoryObjectSendStream[Item], conn: Connection
) -> bool:
    """Take a slot of the step's rate limit and sleep until it comes (in this process: the
    run stays held). False if the limit could not be read: the attempt failed."""
    assert command.rate is not None
    limit, key = command.rate
    started_at = utcnow()
    try:
        go_at = await reserve(conn, limit, key)
    except Exception as exc:  # the attempt fails (and retries by its policy), nothing runs
        retry_at = None
        if command.attempt < command.retry.max_attempts and command.retry.retryable(exc):
            retry_at = utcnow() + timedelta(seconds=command.retry.delay(command.attempt))
        send.send_nowait(
            Finished(command, command.attempt, started_at, error=error_info(exc), retry_at=retry_at)
        )
        return False
    wait = go_at - time.time()
    if wait >= STARTED_NOTICE_AFTER:  # long enough to show in the run view
        until = datetime.fromtimestamp(go_at, UTC)
        send.send_nowait(StillRunning(command, command.attempt, rate_limited_until=until))
    while wait > 0:  # never before the slot (a loop timer may wake a hair early)
        await anyio.sleep(wait)
        wait = go_at - time.time()
    return True


async def _run_attempt(
    command: StepCommand,
    send: MemoryObjectSendStream[Item],
    conn: Connection,
    runtime: StepRuntime,
    run_id: str,
    traced: bool,
) -> None:
    attempt = command.attempt
    started_at = utcnow()
    notice = asyncio.get_running_loop().call_later(
        STARTED_NOTICE_AFTER,
        send.send_nowait,
        StillRunning(command, attempt, started_at=started_at),
    )
    try:
        with tracing.step_attempt(run_id, command, attempt, traced):
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
    if runtime.limiter is not None and not _abandonable(command):
        async with runtime.limiter:
            return await _call(command, runtime, attempt)
    return await _call(command, runtime, attempt)  # (an abandonable one takes it itself)


def _abandonable(command: StepCommand) -> bool:
    """A sync step: its thread is left to run on past its timeout, or past a cancel (a
    worker's shutdown after its grace, a terminate): nothing can stop a thread, and waiting
    for it held ``Worker.shutdown(grace=1)`` as long as the step ran."""
    return not inspect.iscoroutinefunction(command.fn)


async def _call(command: StepCommand, runtime: StepRuntime, attempt: int) -> Any:
    with step_attempt(command.workflow, command.name, command.issued_at):
        # A sync step's slots are waited for before its deadline starts: ``timeout=`` bounds
        # the attempt, not its wait for a thread (100 such steps at once timed out 36).
        slots = await _Slots.take(runtime) if _abandonable(command) else None
        if command.timeout is None:
            return await _call_once(command, runtime, slots)
        with anyio.move_on_after(command.timeout):
            return await _call_once(command, runtime, slots)
        # The deadline passed: say which step and attempt, not an empty TimeoutError.
        raise StepTimeout(command.name, attempt, command.timeout)


async def _call_once(
    command: StepCommand, runtime: StepRuntime, slots: _Slots | None = None
) -> Any:
    fn = command.fn
    if inspect.iscoroutinefunction(fn):
        return await fn(*command.args, **command.kwargs)
    call = functools.partial(_carrying, functools.partial(fn, *command.args, **command.kwargs))
    try:
        if slots is not None:
            result = await _in_a_thread_holding_its_slots(call, slots)
        else:
            result = await anyio.to_thread.run_sync(call, limiter=runtime.thread_limiter)
    except _Carried as carried:  # raised here, as an async step's would be
        raise carried.exc from None
    if inspect.isawaitable(result):
        return await result
    return result


class _Slots:
    """The slots (``max_concurrent_steps``, the worker's threads) of a thread that may be
    abandoned, taken before it starts and given back when it ends."""

    def __init__(self, limiters: list[anyio.CapacityLimiter]) -> None:
        self._limiters = limiters
        self._given_back = False

    @classmethod
    async def take(cls, runtime: StepRuntime) -> _Slots:
        slots = cls([lim for lim in (runtime.limiter, runtime.thread_limiter) if lim is not None])
        for taken, limiter in enumerate(slots._limiters):
            try:
                await limiter.acquire_on_behalf_of(slots)
            except BaseException:
                for earlier in slots._limiters[:taken]:
                    earlier.release_on_behalf_of(slots)
                raise
        return slots

    def give_back(self) -> None:
        if not self._given_back:
            self._given_back = True
            for limiter in self._limiters:
                limiter.release_on_behalf_of(self)


async def _in_a_thread_holding_its_slots(call: Callable[[], Any], slots: _Slots) -> Any:
    """Run ``call`` in a thread that may be abandoned (a sync step past its timeout: nothing
    can stop a thread, so the attempt is recorded as timed out and the thread runs on, its
    result dropped). The thread, not the attempt, holds the step's slots until it ends:
    released with the attempt, its retries ran beside it, and a step that hangs took one more
    thread at each retry, past every bound."""
    loop = asyncio.get_running_loop()
    began = False

    def in_thread() -> Any:
        nonlocal began
        began = True
        try:
            return call()
        finally:
            with contextlib.suppress(RuntimeError):  # the worker's loop is gone: no bound left
                loop.call_soon_threadsafe(slots.give_back)

    try:
        # A limiter of its own, without bound: the slots are the ones taken before.
        return await anyio.to_thread.run_sync(
            in_thread, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(math.inf)
        )
    finally:
        if not began:  # cancelled before its thread ran: nothing else gives them back
            slots.give_back()


class _Carried(Exception):
    """A ``BaseException`` beyond ``Exception`` that a sync step raised, carried out of its
    thread: anyio hands a ``GeneratorExit`` from a thread past every ``except`` of the task
    that awaits it, to its task group (the worker died of one)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


def _carrying(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception:
        raise
    except BaseException as exc:
        raise _Carried(exc) from None
