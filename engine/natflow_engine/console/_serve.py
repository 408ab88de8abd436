"""Running the console under uvicorn inside natflow's own event loop."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Generator
from typing import Final

import anyio
import uvicorn
from starlette.types import ASGIApp

from .._errors import NatflowError

log = logging.getLogger("natflow.console")

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8470


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the caller's process owns SIGINT/SIGTERM),
    which says when it listens."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[int], None] | None) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._ready is not None:
            self._ready(bound_port(self))

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn releases
        return


class _BindError(logging.Filter):
    """Keeps uvicorn's own line for a port it cannot bind (``ERROR: [Errno 98] ...``) out
    of the log, and the error for natflow's message, which names the option to change."""

    def __init__(self) -> None:
        super().__init__()
        self.error: OSError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, OSError):  # uvicorn logs the bind's error object itself
            self.error = record.msg
            return False
        return True


@contextlib.contextmanager
def _bind_errors() -> Generator[_BindError, None, None]:
    caught = _BindError()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addFilter(caught)
    try:
        yield caught
    finally:
        uvicorn_log.removeFilter(caught)


async def serve(
    app: ASGIApp,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    ready: Callable[[int], None] | None = None,
    port_option: str | None = None,
) -> None:
    """Serve ``app`` until cancelled, then shut down cleanly (open live streams get 1 s).

    Args:
        app: the console (:func:`natflow_engine.console.create_app`).
        host: address to bind; 127.0.0.1 unless the console should be reachable from others.
        port: TCP port (0 picks a free one).
        ready: called with the bound port once the server accepts connections.
        port_option: the command-line option that sets ``port``, named by the error if the
            port cannot be bound.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=1,
        access_log=False,
    )
    server = _Server(config, ready)
    async with anyio.create_task_group() as tg:

        async def stop_when_cancelled() -> None:
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True

        tg.start_soon(stop_when_cancelled)
        with (
            anyio.CancelScope(shield=True),
            _bind_errors() as bind,
            contextlib.suppress(SystemExit),  # uvicorn exits when it cannot bind
        ):
            await server.serve()
        tg.cancel_scope.cancel()
    if not server.started:
        raise NatflowError(_not_listening(host, port, bind.error, port_option))


def _not_listening(host: str, port: int, error: OSError | None, option: str | None) -> str:
    why = os.strerror(error.errno) if error is not None and error.errno else "is the port in use?"
    fix = f"pick another with {option}" if option else "pick another port"
    return f"the console could not listen on {host}:{port} ({why}); {fix}"


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with port 0)."""
    for s in server.servers:
        for sock in s.sockets:
            port: int = sock.getsockname()[1]
            return port
    return 0
