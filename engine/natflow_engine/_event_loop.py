"""The asyncio event loop natflow's own processes run on: uvloop where it is installed (a
dependency on Linux and macOS), else the standard library's.

uvloop is asyncio's event loop on libuv, in C: the same ``asyncio`` API, so anyio and nats-py
run on it unchanged, with sockets, callbacks and timers handled outside the interpreter. A
natflow process spends much of its CPU there (one small message after another), and uvloop
took ~6 % off the CPU per run of all processes together (``natflow bench --scale 1`` on the
2-core VM, alternating, medians: relaxed, 3,000 runs, five pairs, 1.69 -> 1.60 ms and 1,140
-> 1,240 runs/s; durable, 2,000 runs, four pairs, 2.22 -> 2.08 ms and 689 -> 734 runs/s).

It applies to the processes the ``natflow`` command starts (worker, engine, dev, console,
bench and their children). An application that runs a :class:`Worker` or :class:`Client`
under its own ``asyncio.run`` picks its loop itself. ``NATFLOW_EVENT_LOOP=asyncio`` picks the
standard loop (to rule uvloop out while chasing a problem); ``uvloop`` insists on it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from importlib import metadata
from typing import Any, Final, TypeVar

from ._errors import InvalidInput

LOOP_ENV: Final = "NATFLOW_EVENT_LOOP"
_CHOICES: Final = ("uvloop", "asyncio")

T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _uvloop() -> LoopFactory | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_factory() -> LoopFactory | None:
    """The loop the environment asks for: uvloop's factory, or None for asyncio's own.

    :class:`InvalidInput` if ``NATFLOW_EVENT_LOOP`` names neither, or asks for uvloop where
    it is not installed."""
    wanted = os.environ.get(LOOP_ENV, "").strip().lower()
    if wanted not in ("", *_CHOICES):
        raise InvalidInput(
            f"{LOOP_ENV} is {wanted!r}: set it to 'uvloop' or 'asyncio', or leave it unset "
            "(uvloop where installed)"
        )
    if wanted == "asyncio":
        return None
    factory = _uvloop()
    if factory is None and wanted == "uvloop":
        raise InvalidInput(
            f"{LOOP_ENV}=uvloop, but uvloop is not installed: `pip install uvloop`, or unset "
            f"{LOOP_ENV} to run on asyncio's own loop"
        )
    return factory


def event_loop_name() -> str:
    """What :func:`run_event_loop` runs on here, e.g. ``uvloop 0.21.0`` or ``asyncio``."""
    if loop_factory() is None:
        return "asyncio"
    return f"uvloop {metadata.version('uvloop')}"


def running_loop_name() -> str:
    """The kind of loop this code runs on (``uvloop``, ``asyncio``, ...), for startup logs."""
    return type(asyncio.get_running_loop()).__module__.split(".", 1)[0]


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_factory` picks."""
    try:
        factory = loop_factory()
    except BaseException:
        main.close()  # never awaited: say nothing of it beyond the error
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
