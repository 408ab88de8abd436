"""How much each phase of ``natflow bench`` does, from the defaults, ``--quick`` and the flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace

from natflow_engine import InvalidInput

from .._supervisor import process_count

RUN_STEPS = 3  # steps of each throughput and warm-up run
IDLE_GAP = 0.05  # seconds between idle round trips and between idle starts


def one_per_core() -> int:
    """Worker processes of the throughput phase: as many as ``natflow worker`` runs by
    default (``--processes auto``), so the phase measures what that command deploys."""
    return process_count("auto")


@dataclass(frozen=True)
class Sizes:
    """How much each phase does. ``--quick`` shrinks everything for tests."""

    raw_sync: int = 2000
    raw_async: int = 20_000
    steps: int = 200
    runs: int = 500
    workers: int = field(default_factory=one_per_core)
    clients: int = 1  # processes that start and await the throughput phase's runs
    engines: int = 1  # `natflow engine` processes beside the throughput phase's workers
    scale: tuple[int, ...] = ()  # worker counts of a scale-out bench (only raw + throughput)
    idle_samples: int = 20
    replay_events: tuple[int, ...] = (1000, 10_000)
    replay_repeat: int = 5
    concurrency: int = 100
    timers: int = 200
    timer_sleep: float = 1.5  # over the 1 s a worker would wait for itself: the engine wakes it
    kill_rounds: int = 5
    schedule_seconds: float = 30.0
    loop_steps: int = 100_000  # one run through continue-as-new
    loop_kill_steps: int = 10_000  # a run whose worker is killed at a random point


QUICK = Sizes(
    workers=1,
    raw_sync=200,
    raw_async=2000,
    steps=20,
    runs=150,  # enough for a CPU window (MIN_CPU_WINDOW) on a fast machine: 30 took 30 ms
    idle_samples=5,
    replay_events=(100, 1000),
    replay_repeat=3,
    timers=20,
    kill_rounds=1,
    schedule_seconds=5.0,
    loop_steps=2_500,
    loop_kill_steps=3_000,
)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK if args.quick else Sizes()
    chosen = {
        k: getattr(args, k)
        for k in ("steps", "runs", "workers", "concurrency", "clients", "engines")
        if getattr(args, k, None) is not None
    }
    most = max(16, 4 * (os.cpu_count() or 1))  # processes: a typo started 100,000 engines
    for name, value in chosen.items():
        if value < 1:
            raise InvalidInput(f"--{name} must be at least 1")
        if name in ("workers", "clients", "engines") and value > most:
            raise InvalidInput(
                f"--{name} {value} is more processes than this machine can run side by side "
                f"(at most {most}, four per core)"
            )
    sizes = replace(sizes, **chosen)
    scale = getattr(args, "scale", None)
    return sizes if scale is None else replace(sizes, scale=parse_scale(scale))


def parse_scale(text: str) -> tuple[int, ...]:
    """``--scale 1,4,8,16``: the worker counts, each at least 1, in the order given."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise InvalidInput(
            f"--scale {text!r}: give worker counts separated by commas, each at least 1 "
            "(e.g. --scale 1,4,8,16)"
        )
    return counts
