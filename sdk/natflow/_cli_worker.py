"""``natflow worker MODULE[:ATTR]``: contributed to the engine's CLI as an entry point."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
from natflow_engine import (
    DEFAULT_WORKER_PORT,
    AesGcmCodec,
    InvalidInput,
    ServerUnavailable,
    add_metrics_options,
    connect_options,
    one_error,
    positive_int,
    seconds,
    serve_metrics,
    tune_collector,
)

from ._client import Client
from ._factory import is_worker_factory
from ._supervisor import Supervisor, process_count
from ._user_frames import import_failure
from ._worker import Worker
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "worker",
        help="serve the workflows of a Python module or file",
        description="Serve the workflows of a Python module (imported from the current "
        "folder) or a path/to/file.py (its folder goes on the import path). Without :ATTR, "
        "every @workflow the module defines is served.",
    )
    p.add_argument(
        "target",
        metavar="MODULE[:ATTR]",
        help="module (or .py file); ATTR: a workflow, a list of them, or a function "
        "returning a Worker (annotated -> Worker, or taking a parameter annotated Client)",
    )
    p.add_argument(
        "--queue",
        metavar="QUEUE",
        default=None,
        help="serve this queue (default: each workflow's own, as @workflow(queue=...) says)",
    )
    p.add_argument(
        "--max-concurrent-runs",
        metavar="N",
        type=positive_int,
        default=100,
        help="runs held at once; more wait in the queue",
    )
    p.add_argument(
        "--max-concurrent-steps",
        metavar="N",
        type=positive_int,
        default=None,
        help="steps running at once across those runs (default: no limit)",
    )
    p.add_argument(
        "--identity",
        metavar="NAME",
        default=None,
        help="this worker's name in `natflow workers` (default: host-pid-random)",
    )
    p.add_argument(
        "--grace",
        metavar="SECONDS",
        type=seconds(),
        default=30.0,
        help="on SIGTERM or Ctrl-C, seconds to let held runs reach a stopping point",
    )
    p.add_argument(
        "--processes",
        metavar="N",
        type=process_count,
        default="auto",
        help="worker processes to run and supervise, their metrics summed on one port (a "
        "dead one is started again; SIGTERM drains them all; one that cannot start ends the "
        "command); default auto: one per core; 1: this process alone",
    )
    add_metrics_options(p, DEFAULT_WORKER_PORT, "NATFLOW_WORKER_METRICS_PORT")
    p.set_defaults(handler=run_worker_command)


def load_target(target: str) -> tuple[list[Workflow], Any]:
    """The workflows named by ``MODULE[:ATTR]``, or a Worker factory.

    ``MODULE`` is a module name, imported with the current folder on the import path, or a
    ``path/to/file.py``, loaded with its folder on the import path (so its own imports work).
    """
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise InvalidInput(f"{target!r} names no module; write MODULE[:ATTR], e.g. app:WORKFLOWS")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        if not path.is_file():
            raise InvalidInput(f"no file {module_name} (from {Path.cwd()})")
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise InvalidInput(f"cannot load {module_name}: not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise import_failure(module_name, exc) from None
    else:
        sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                # The module exists; something it imports does not: where, in their code.
                raise import_failure(module_name, exc) from None
            raise InvalidInput(
                f"no module named {module_name!r} (from {Path.cwd()}); run from the folder "
                "that holds it, or pass a path/to/file.py"
            ) from None
        except Exception as exc:
            raise import_failure(module_name, exc) from None
    if not attr:
        found = [v for v in vars(module).values() if isinstance(v, Workflow)]
        if not found:
            raise InvalidInput(f"module {module_name!r} defines no @workflow")
        return found, None
    value = getattr(module, attr, None)
    if value is None:
        raise InvalidInput(f"module {module_name!r} has no attribute {attr!r}")
    if isinstance(value, Workflow):
        return [value], None
    if isinstance(value, list | tuple) and all(isinstance(v, Workflow) for v in value):
        return list(value), None
    if is_worker_factory(value):
        return [], value
    raise InvalidInput(
        f"{attr!r} in module {module_name!r} is not a workflow, a list of workflows, nor a "
        f"function returning a Worker (natflow calls only a factory that says so: "
        f"def {attr}(client: Client) -> Worker)"
    )


async def _connect_with_retry(args: argparse.Namespace) -> Client:
    delay = 0.5
    while True:
        try:
            return await Client.connect(
                args.url,
                connect_timeout=2.0,
                codec=AesGcmCodec.from_env(),  # NATFLOW_CODEC_KEYS
                **connect_options(args),
            )
        except ServerUnavailable as exc:
            log.warning("%s; retrying in %.1f s", exc, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def run_worker_command(args: argparse.Namespace) -> int:
    workflows, factory = load_target(args.target)  # a bad target fails here, once
    if args.processes != 1:
        supervisor = Supervisor(
            args.processes,
            sys.argv[1:],
            identity=args.identity,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            grace=args.grace,
        )
        return await supervisor.run()
    tune_collector()  # after the workflows' module is loaded: it is frozen with the rest
    serve_metrics(args.metrics_port, args.metrics_host)
    client = await _connect_with_retry(args)
    try:
        if factory is not None:
            takes_client = bool(inspect.signature(factory).parameters)
            try:  # whether it can be called so: a TypeError from inside it stays its own
                inspect.signature(factory).bind(*([client] if takes_client else []))
            except TypeError as exc:
                raise InvalidInput(
                    f"{args.target} is a callable, so natflow calls it (with the client, if it "
                    f"takes an argument) to make the Worker; it cannot be called so ({exc}): "
                    f"name a module, a workflow, a list of workflows, or a function of the "
                    f"client that returns a Worker"
                ) from None
            made = factory(client) if takes_client else factory()
            worker = await made if inspect.isawaitable(made) else made
            if not isinstance(worker, Worker):
                raise InvalidInput(f"{args.target} returned {worker!r}, not a Worker")
        else:
            worker = Worker(
                client,
                workflows,
                queue=args.queue,
                max_concurrent_runs=args.max_concurrent_runs,
                max_concurrent_steps=args.max_concurrent_steps,
                identity=args.identity,
            )
        stopped_by: list[int] = []
        drained = anyio.Event()
        with one_error():  # a natflow error as one line, a bug with its traceback
            async with anyio.create_task_group() as tg:

                async def drain() -> None:
                    with anyio.move_on_after(args.grace + _THREADS_GRACE):
                        await worker.shutdown(grace=args.grace)
                        # The process would wait for them at its exit. A count the threads'
                        # ends keep, looked at 10 times a second while a worker stops only.
                        while worker.step_threads:  # noqa: ASYNC110
                            await anyio.sleep(0.1)
                        drained.set()
                        return
                    # Its runs are handed back; what is left is a sync step's thread, which
                    # nothing can stop, and which kept the process alive to its end.
                    log.warning(
                        "step threads still run %g s past the grace; exiting without them "
                        "(their runs were handed back)",
                        _THREADS_GRACE,
                    )
                    os._exit(_exit_status(stopped_by[0]))

                async def on_signal() -> None:
                    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            name = signal.Signals(signum).name
                            if stopped_by:  # the second: no more waiting
                                log.warning(
                                    "%s again: stopping now; runs not yet handed back go to "
                                    "another worker once their leases lapse",
                                    name,
                                )
                                os._exit(128 + signum)
                            stopped_by.append(signum)
                            log.info(
                                "%s: draining (grace %g s; send it again to stop at once)",
                                name,
                                args.grace,
                            )
                            tg.start_soon(drain)

                tg.start_soon(on_signal)
                await worker.run()
                if stopped_by:
                    # run() ends as the grace does, before the shutdown has handed the held
                    # runs back: cancelled there, it handed back one or two, and the rest,
                    # left to their leases, were counted as deaths (blocked after three
                    # rolling restarts).
                    await drained.wait()
                tg.cancel_scope.cancel()
        return _exit_status(stopped_by[0]) if stopped_by else 0
    finally:
        await client.close()


_THREADS_GRACE = 10.0  # seconds past the grace a step's thread may keep a stopping worker


def _exit_status(signum: int) -> int:
    """A drain asked for with Ctrl-C ends as Ctrl-C does (130, README); one asked for by
    SIGTERM, the way a service is stopped, is a clean exit (0)."""
    return 130 if signum == signal.SIGINT else 0
