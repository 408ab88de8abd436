"""One run driven by one worker: replay its history, then continue live.

The workflow's coroutines run on a :class:`WorkflowLoop`; this driver runs on the worker's
asyncio loop. It delivers recorded step outcomes in history order (replay), then runs new
steps for real. Every live outcome is appended to history first and delivered to the
workflow second, so history order is delivery order and every replay decides races alike.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import inspect
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from engine import (
    ErrorInfo,
    InvalidInput,
    NonDeterminismError,
    RetryPolicy,
    StepError,
    to_seconds,
)
from engine._codec import decode_value, encode_value, error_info
from engine._connection import Connection
from engine._events import (
    Event,
    PatchMarked,
    RunBlocked,
    RunClaimed,
    RunCompleted,
    RunFailed,
    RunStarted,
    StepCompleted,
    StepFailed,
    StepStarted,
    utcnow,
)
from engine._history import History, HistoryStore
from engine._names import check_step_name
from engine._retry import NO_RETRY

from ._context import WorkflowContext
from ._loop import WorkflowLoop
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")

# A step still running after this long gets a step_started event, so `natflow runs show`
# can say what a run is doing; fast steps cost one append (their completion) and no more.
STARTED_NOTICE_AFTER = 0.5


class Outcome(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"
    LOST = "lost"  # another worker holds the run now; this one steps back
    HANDED_BACK = "handed_back"  # the worker is draining; running steps were recorded


class Evicted(BaseException):
    """Private control flow: the run was dropped from this worker. User code cannot catch it
    with ``except Exception``."""


@dataclass(eq=False)
class StepCommand:
    seq: int
    name: str
    occurrence: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: RetryPolicy
    timeout: float | None
    result_type: Any
    future: asyncio.Future[Any]


@dataclass
class _Finished:
    command: StepCommand
    attempt: int
    started_at: datetime
    result: bytes | None = None
    error: ErrorInfo | None = None


@dataclass
class _StillRunning:
    command: StepCommand
    attempt: int


@dataclass
class StepRuntime:
    """What a worker lends its runs: the step concurrency limit."""

    limiter: anyio.CapacityLimiter | None = None
    thread_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(64))


def _seed(run_id: str) -> int:
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big")


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


class RunExecution:
    """Replays and continues one run; see the module docstring."""

    def __init__(
        self,
        *,
        workflow: Workflow,
        history: History,
        store: HistoryStore,
        conn: Connection,
        identity: str,
        runtime: StepRuntime,
        delivery: int = 1,
    ) -> None:
        start = history.events[0]
        assert isinstance(start, RunStarted)
        self.workflow = workflow
        self.run_id = history.run_id
        self.seed = _seed(history.run_id)
        self.now: datetime = start.at
        self.replaying = True
        self._start = start
        self._store = store
        self._conn = conn
        self._identity = identity
        self._runtime = runtime
        self._delivery = delivery
        self._count = len(history.events)
        self._last_seq = history.last_seq
        self._last_event = history.events[-1]
        self._recorded: dict[int, StepCompleted | StepFailed] = {}
        self._replay: deque[StepCompleted | StepFailed] = deque()
        self._patches = {e.change_id for e in history.events if isinstance(e, PatchMarked)}
        self._started: dict[int, str] = {}  # steps history saw start, by position
        for event in history.events:
            if isinstance(event, StepCompleted | StepFailed):
                self._recorded[event.seq] = event
                self._replay.append(event)
            elif isinstance(event, StepStarted):
                self._started[event.seq] = event.name
        self._patch_memo: dict[str, bool] = {}
        self._new_markers: list[str] = []
        self._commands: dict[int, StepCommand] = {}
        self._to_launch: list[StepCommand] = []
        self._occurrences: Counter[str] = Counter()
        self._next_seq = 1
        self._inflight = 0
        self._evicted = False
        self._draining = False
        self.block: NonDeterminismError | None = None
        self._loop = WorkflowLoop()  # type: ignore[abstract]
        self._ctx = WorkflowContext(self)
        self._root: asyncio.Task[Any] | None = None
        self._send: MemoryObjectSendStream[_Finished | _StillRunning] | None = None

    # -- called by workflow code (on the workflow loop) ------------------------------------

    def issue_step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        retry: RetryPolicy | None,
        timeout: float | timedelta | None,
    ) -> asyncio.Future[Any]:
        if self._evicted:
            raise Evicted()
        check_step_name(name)
        if not callable(fn):
            raise InvalidInput(f"step {name!r}: {fn!r} is not callable")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"step {name!r}: retry must be a RetryPolicy")
        seconds = None if timeout is None else to_seconds(f"timeout of step {name!r}", timeout)
        seq = self._next_seq
        self._next_seq += 1
        self._occurrences[name] += 1
        command = StepCommand(
            seq=seq,
            name=name,
            occurrence=self._occurrences[name],
            fn=fn,
            args=args,
            kwargs=kwargs,
            retry=retry or self.workflow.retry or NO_RETRY,
            timeout=seconds,
            result_type=_return_type(fn),
            future=self._loop.create_future(),
        )
        self._commands[seq] = command
        recorded = self._recorded.get(seq)
        started = recorded.name if recorded is not None else self._started.get(seq)
        if started is not None and started != name:
            self._diverged(seq, expected=name, recorded=started)
        elif recorded is None:
            self._to_launch.append(command)
        return command.future

    def patched(self, change_id: str) -> bool:
        if self._evicted:
            raise Evicted()
        if change_id not in self._patch_memo:
            if change_id in self._patches:
                value = True
            elif self.replaying:
                value = False
            else:
                value = True
                self._new_markers.append(change_id)
            self._patch_memo[change_id] = value
        return self._patch_memo[change_id]

    # -- the driver ------------------------------------------------------------------------

    def drain(self) -> None:
        """Start no new step; once running ones are recorded, hand the run back."""
        self._draining = True

    async def execute(self) -> Outcome:
        """Replay, claim the run, continue live until it completes, fails or is lost."""
        try:
            self._begin()
            if self.block is not None:
                await self._record_block()
                return Outcome.BLOCKED
            if not await self._claim():
                return Outcome.LOST
            send, receive = anyio.create_memory_object_stream[_Finished | _StillRunning](math.inf)
            self._send = send
            try:
                async with anyio.create_task_group() as tg:
                    outcome = await self._guarded_live(tg, receive)
                    tg.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1:  # the worker handles the error, not the group
                    raise group.exceptions[0] from None
                raise
            return outcome
        finally:
            self._dispose()

    async def _guarded_live(
        self,
        tg: anyio.abc.TaskGroup,
        receive: MemoryObjectReceiveStream[_Finished | _StillRunning],
    ) -> Outcome:
        try:
            return await self._live(tg, receive)
        except _Fenced:
            log.info("run %s: another worker took it over; stepping back", self.run_id)
            return Outcome.LOST

    def _begin(self) -> None:
        self._root = self._loop.create_task(self._main(), name=f"workflow {self.run_id}")
        self._tick()
        while self._replay and self.block is None:
            event = self._replay.popleft()
            command = self._commands.get(event.seq)
            if command is None:
                self._diverged(event.seq, expected=None, recorded=event.name)
                break
            self.replaying = bool(self._replay)
            self.now = event.at
            self._resolve(command, event)
            self._tick()
            if self._root.done() and self._replay:
                nxt = self._replay[0]
                self._diverged(nxt.seq, expected=None, recorded=nxt.name)
        self.replaying = False

    async def _main(self) -> Any:
        value: Any = None
        if self.workflow.takes_input:
            value = decode_value(
                f"input of workflow {self.workflow.name!r}",
                self._start.input,
                self.workflow.input_type,
            )
        return await self.workflow(self._ctx, value)

    def _tick(self) -> None:
        self._loop.run_until_idle()

    def _diverged(self, position: int, *, expected: str | None, recorded: str | None) -> None:
        if self.block is None:
            self.block = NonDeterminismError(self.run_id, position, expected, recorded)

    def _resolve(self, command: StepCommand, event: StepCompleted | StepFailed) -> None:
        if command.future.done():
            return
        if isinstance(event, StepFailed):
            command.future.set_exception(StepError(command.name, event.error))
            return
        try:
            value = decode_value(
                f"result of step {command.name!r}", event.result, command.result_type
            )
        except InvalidInput:
            value = msgspec.json.decode(event.result)
        command.future.set_result(value)

    async def _append(self, event: Event) -> None:
        from engine._history import AppendConflict

        try:
            self._last_seq = await self._store.append(self.run_id, event, self._last_seq)
        except AppendConflict as exc:
            raise _Fenced() from exc
        self._count += 1
        self._last_event = event

    def _next_id(self) -> str:
        return f"{self.run_id}:{self._count + 1}"

    async def _claim(self) -> bool:
        try:
            await self._append(
                RunClaimed(
                    id=self._next_id(),
                    at=utcnow(),
                    worker=self._identity,
                    delivery=self._delivery,
                )
            )
        except _Fenced:
            log.info("run %s: claimed by another worker first; stepping back", self.run_id)
            return False
        return True

    async def _record_block(self) -> None:
        assert self.block is not None
        info = ErrorInfo(type="NonDeterminismError", message=str(self.block))
        last = self._last_event
        if isinstance(last, RunBlocked) and last.error.message == info.message:
            return
        log.error("%s", self.block)
        try:
            await self._append(
                RunBlocked(
                    id=self._next_id(), at=utcnow(), position=self.block.position, error=info
                )
            )
        except _Fenced:
            log.info("run %s changed while being blocked; it will be retried", self.run_id)

    async def _live(
        self,
        tg: anyio.abc.TaskGroup,
        receive: MemoryObjectReceiveStream[_Finished | _StillRunning],
    ) -> Outcome:
        assert self._root is not None
        self._launch(tg)
        while not self._root.done():
            await self._flush_markers()
            if self._draining and self._inflight == 0:
                return Outcome.HANDED_BACK
            if self._inflight == 0:
                return await self._fail(
                    ErrorInfo(
                        type="NatflowError",
                        message="the workflow awaits something natflow cannot deliver (only "
                        "ctx calls may be awaited inside a workflow)",
                    )
                )
            item = await receive.receive()
            if isinstance(item, _StillRunning):
                await self._append(
                    StepStarted(
                        id=self._next_id(),
                        at=utcnow(),
                        seq=item.command.seq,
                        name=item.command.name,
                        occurrence=item.command.occurrence,
                        attempt=item.attempt,
                    )
                )
                continue
            event = self._outcome_event(item)
            await self._append(event)
            self._inflight -= 1
            self.now = event.at
            self._resolve(item.command, event)
            self._tick()
            self._launch(tg)
        await self._flush_markers()
        return await self._finish()

    def _outcome_event(self, item: _Finished) -> StepCompleted | StepFailed:
        cmd = item.command
        if item.error is not None:
            return StepFailed(
                id=self._next_id(),
                at=utcnow(),
                seq=cmd.seq,
                name=cmd.name,
                occurrence=cmd.occurrence,
                attempt=item.attempt,
                started_at=item.started_at,
                error=item.error,
            )
        assert item.result is not None
        return StepCompleted(
            id=self._next_id(),
            at=utcnow(),
            seq=cmd.seq,
            name=cmd.name,
            occurrence=cmd.occurrence,
            attempt=item.attempt,
            started_at=item.started_at,
            result=msgspec.Raw(item.result),
        )

    async def _flush_markers(self) -> None:
        while self._new_markers:
            change_id = self._new_markers.pop(0)
            await self._append(PatchMarked(id=self._next_id(), at=utcnow(), change_id=change_id))
            self._patches.add(change_id)

    def _launch(self, tg: anyio.abc.TaskGroup) -> None:
        if self._draining:
            return  # the next holder replays and issues these again
        launch, self._to_launch = self._to_launch, []
        for command in launch:
            self._inflight += 1
            tg.start_soon(self._run_step, command, name=f"step {command.name}")

    async def _finish(self) -> Outcome:
        assert self._root is not None
        exc = self._root.exception() if not self._root.cancelled() else None
        if exc is not None:
            return await self._fail(error_info(exc))
        try:
            data = encode_value(f"result of workflow {self.workflow.name!r}", self._root.result())
            self._conn.check_size(f"result of run {self.run_id!r}", len(data))
        except InvalidInput as error:
            return await self._fail(error_info(error))
        await self._append(RunCompleted(id=self._next_id(), at=utcnow(), result=msgspec.Raw(data)))
        return Outcome.COMPLETED

    async def _fail(self, error: ErrorInfo) -> Outcome:
        await self._append(RunFailed(id=self._next_id(), at=utcnow(), error=error))
        return Outcome.FAILED

    # -- steps (on the worker's loop) ------------------------------------------------------

    async def _run_step(self, command: StepCommand) -> None:
        assert self._send is not None
        attempt = 0
        while True:
            attempt += 1
            started_at = utcnow()
            notice = asyncio.get_running_loop().call_later(
                STARTED_NOTICE_AFTER, self._send.send_nowait, _StillRunning(command, attempt)
            )
            try:
                value = await self._invoke(command)
            except Exception as exc:
                if attempt < command.retry.max_attempts and command.retry.retryable(exc):
                    delay = command.retry.delay(attempt)
                    log.warning(
                        "run %s: step %r attempt %d failed (%s: %s); retrying in %.2f s",
                        self.run_id,
                        command.name,
                        attempt,
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                    notice.cancel()
                    await anyio.sleep(delay)
                    continue
                self._send.send_nowait(
                    _Finished(command, attempt, started_at, error=error_info(exc))
                )
                return
            finally:
                notice.cancel()
            try:
                data = encode_value(f"result of step {command.name!r}", value)
                self._conn.check_size(f"result of step {command.name!r}", len(data))
            except InvalidInput as exc:
                self._send.send_nowait(
                    _Finished(command, attempt, started_at, error=error_info(exc))
                )
                return
            self._send.send_nowait(_Finished(command, attempt, started_at, result=data))
            return

    async def _invoke(self, command: StepCommand) -> Any:
        limiter = self._runtime.limiter
        if limiter is not None:
            async with limiter:
                return await self._call(command)
        return await self._call(command)

    async def _call(self, command: StepCommand) -> Any:
        fn = command.fn
        if command.timeout is None:
            return await self._call_once(fn, command)
        with anyio.fail_after(command.timeout):
            return await self._call_once(fn, command)

    async def _call_once(self, fn: Callable[..., Any], command: StepCommand) -> Any:
        if inspect.iscoroutinefunction(fn):
            return await fn(*command.args, **command.kwargs)
        result = await anyio.to_thread.run_sync(
            functools.partial(fn, *command.args, **command.kwargs),
            abandon_on_cancel=command.timeout is not None,
            limiter=self._runtime.thread_limiter,
        )
        if inspect.isawaitable(result):
            return await result
        return result

    # -- teardown --------------------------------------------------------------------------

    def _dispose(self) -> None:
        """Close the workflow's coroutines; any ctx call they make now raises Evicted."""
        self._evicted = True
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        try:
            self._loop.run_until_idle()
        except BaseException:  # user finally-blocks during teardown: nothing left to protect
            log.debug("run %s: error while closing workflow code", self.run_id, exc_info=True)
        self._loop.close()


class _Fenced(Exception):
    """An append met a newer history: this worker no longer holds the run."""
