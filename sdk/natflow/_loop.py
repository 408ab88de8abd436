"""A deterministic event loop for workflow code.

Workflow coroutines run on this loop, not on the worker's asyncio loop. It has no clock, no
I/O and no threads: it only runs ready callbacks, in FIFO order, until none is left. The
worker ticks it after each event it delivers (a step's recorded outcome, in history order),
so live execution and every replay interleave parallel branches identically: the order of
events in history decides every race.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from natflow_engine import NatflowError

log = logging.getLogger("natflow.workflow")

T = TypeVar("T")


class NotDurable(NatflowError):
    """Workflow code used a clock, I/O, a thread or a process, which replay cannot reproduce."""


# What asyncio reaches for to do I/O or start threads and processes. Their results are not
# in history, so a replay could not reproduce them: they belong in a step.
_IO_CALLS = frozenset(
    {
        "run_in_executor",
        "set_default_executor",
        "shutdown_default_executor",
        "getaddrinfo",
        "getnameinfo",
        "create_connection",
        "create_server",
        "sendfile",
        "start_tls",
        "create_unix_connection",
        "create_unix_server",
        "connect_accepted_socket",
        "create_datagram_endpoint",
        "connect_read_pipe",
        "connect_write_pipe",
        "subprocess_shell",
        "subprocess_exec",
        "add_reader",
        "remove_reader",
        "add_writer",
        "remove_writer",
        "add_signal_handler",
        "remove_signal_handler",
    }
)


class WorkflowLoop(asyncio.AbstractEventLoop):
    """Runs workflow coroutines deterministically; see the module docstring."""

    def __init__(self) -> None:
        self._ready: deque[asyncio.Handle] = deque()
        self._closed = False
        self.errors: list[BaseException] = []
        # This loop's own tasks: asyncio.all_tasks() would walk every task of the process.
        self.tasks: set[asyncio.Task[Any]] = set()

    # -- the driver's side -----------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Run ready callbacks until every workflow task waits on something undelivered."""
        outer = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    try:
                        handle._run()
                    except (KeyboardInterrupt, SystemExit) as exc:
                        # asyncio re-raises these after storing them on the task; the task
                        # holds the error (it fails the run), the worker must not exit.
                        self.errors.append(exc)
        finally:
            asyncio.events._set_running_loop(outer)

    def has_ready(self) -> bool:
        """Whether a callback waits to run."""
        return bool(self._ready)

    # -- what asyncio.Task, Future and gather call -----------------------------------------

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        # From another thread (anyio.to_thread, run_in_executor): raising would only end
        # that thread, with a traceback in the log. The wake-up is dropped; the workflow,
        # left waiting on what never comes, fails as awaiting what natflow cannot deliver.
        log.debug("workflow loop: a wake-up from another thread dropped (%r)", callback)
        handle = asyncio.Handle(callback, args, self, context)
        handle.cancel()
        return handle

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(  # type: ignore[override]
        self,
        coro: Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        task = asyncio.Task(coro, loop=self, name=name, context=context)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        raise NotDurable(
            "asyncio.sleep and asyncio timeouts are not durable inside a workflow; "
            "use ctx.sleep(...) or a step's timeout="
        )

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_later(0, callback, *args, context=context)

    def time(self) -> float:
        return 0.0

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return True

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._ready.clear()

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.call_exception_handler(context)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            self.errors.append(exc)
        log.debug("workflow loop: %s", context.get("message"), exc_info=exc)

    def get_exception_handler(self) -> None:
        return None

    def get_task_factory(self) -> None:
        # anyio asks before each task a task group starts: refused, an anyio task group in
        # workflow code failed its run with an ExceptionGroup that hid why.
        return None


def _refusal(name: str) -> Callable[..., NoReturn]:
    if name in _IO_CALLS or name.startswith("sock_"):
        message = (
            f"workflow code cannot do I/O or start threads or processes (loop.{name}): "
            "put it in a ctx.step"
        )
    else:
        message = f"workflow code cannot call loop.{name}: it runs on natflow's replay loop"

    def refused(self: WorkflowLoop, *args: object, **kwargs: object) -> NoReturn:
        raise NotDurable(message)

    refused.__name__ = name
    return refused


# Every AbstractEventLoop method this loop does not define would raise a bare
# NotImplementedError; computed rather than listed so a newer Python's additions are covered.
for _name, _value in vars(asyncio.AbstractEventLoop).items():
    if callable(_value) and not _name.startswith("_") and _name not in vars(WorkflowLoop):
        setattr(WorkflowLoop, _name, _refusal(_name))
