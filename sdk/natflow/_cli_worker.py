"""``natflow worker MODULE[:ATTR]``: contributed to the engine's CLI as an entry point."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import logging
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
    serve_metrics,
)

from ._client import Client
from ._worker import Worker
from ._workflow import Workflow

log = logging.getLogger("natflow.worker")


def register(sub: Any) -> None:
    p = sub.add_parser("worker", help="serve the workflows of a Python module")
    p.add_argument(
        "target",
        metavar="MODULE[:ATTR]",
        help="module (or .py file); ATTR: a workflow, a list of them, or a "
        "callable returning a Worker",
    )
    p.add_argument("--queue", default=None, help="serve this queue (default: the workflows')")
    p.add_argument("--max-concurrent-runs", type=int, default=100)
    p.add_argument("--max-concurrent-steps", type=int, default=None)
    p.add_argument("--identity", default=None)
    p.add_argument(
        "--grace", type=float, default=30.0, help="seconds to finish held runs on SIGTERM"
    )
    add_metrics_options(p, DEFAULT_WORKER_PORT, "NATFLOW_WORKER_METRICS_PORT")
    p.set_defaults(handler=run_worker_command)


def load_target(target: str) -> tuple[list[Workflow], Any]:
    """The workflows named by ``MODULE[:ATTR]``, or a Worker factory."""
    module_name, _, attr = target.partition(":")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise InvalidInput(f"cannot load {module_name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, str(Path.cwd()))
        module = importlib.import_module(module_name)
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
    if callable(value):
        return [], value
    raise InvalidInput(f"{target} is neither a workflow, a list of them, nor a callable")


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
    workflows, factory = load_target(args.target)
    serve_metrics(args.metrics_port, args.metrics_host)
    client = await _connect_with_retry(args)
    try:
        if factory is not None:
            made = factory(client) if inspect.signature(factory).parameters else factory()
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
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info(
                            "%s: draining (grace %.0f s)", signal.Signals(signum).name, args.grace
                        )
                        await worker.shutdown(grace=args.grace)
                        return

            tg.start_soon(on_signal)
            await worker.run()
            tg.cancel_scope.cancel()
        return 0
    finally:
        await client.close()
