"""``natflow bench --scale 1,4,8,16``: the throughput phase once per worker count, on one
server, and where the curve bends.

Each point is the full throughput phase (``_throughput``): the same runs, engines and
clients, only the number of worker processes changes. Beside runs/s it reports how busy each
kind of process was, per process, so the figure says what bounds it: a client, engine or
server process near a whole core, or a machine with no core left.
"""

from __future__ import annotations

import os

import msgspec

from ._report import REPORT_VERSION, Cpu, Environment, Raw, Throughput

SATURATED = 85.0  # % of one core at which a process is what bounds the figure


class ScalePoint(msgspec.Struct, kw_only=True):
    """One throughput phase, and which process (or the machine) was the busiest."""

    throughput: Throughput
    busiest: str  # "client", "worker", "engine", "server" or "machine"
    busiest_pct: float  # that process's % of one core (for "machine": of all cores)
    # None: nothing observed was saturated, but the server's CPU was not observed (--url),
    # so what bound the point is unknown
    saturated: bool | None


class ScaleReport(msgspec.Struct, kw_only=True):
    version: int = REPORT_VERSION
    kind: str = "scale"
    environment: Environment
    elapsed_s: float
    raw: Raw
    points: list[ScalePoint]


def point(tp: Throughput, cpus: int | None = None) -> ScalePoint:
    """What bound the point while the runs ran: the machine when its cores were spent,
    else a Python process (client, worker or engine: one core each) near a whole core, else
    the server. nats-server runs on many threads, so its share may pass one core; where it
    is the busiest and nothing else is near its limit, its serial work (a stream's writes,
    one fsync after another) is what the runs wait on. A server whose CPU this machine cannot
    read (``--url``) may be that bound too: then, short of a saturated machine or Python
    process, ``saturated`` is None, unknown."""
    cpu = tp.cpu_running or tp.cpu
    python = _per_process(tp)
    cores = cpus or os.cpu_count() or 1
    machine = _busy(cpu) / cores
    if machine >= SATURATED:
        return ScalePoint(throughput=tp, busiest="machine", busiest_pct=machine, saturated=True)
    busiest = max(python, key=lambda k: python[k])
    if python[busiest] >= SATURATED:
        pct = python[busiest]
        return ScalePoint(throughput=tp, busiest=busiest, busiest_pct=pct, saturated=True)
    if cpu.server is None:  # not ours to read: it may be what bound the point
        pct = python[busiest]
        return ScalePoint(throughput=tp, busiest=busiest, busiest_pct=pct, saturated=None)
    server = cpu.server
    if server >= python[busiest]:
        return ScalePoint(
            throughput=tp, busiest="server", busiest_pct=server, saturated=server >= SATURATED
        )
    return ScalePoint(throughput=tp, busiest=busiest, busiest_pct=python[busiest], saturated=False)


def _per_process(tp: Throughput) -> dict[str, float]:
    """Each Python kind's % of one core per process, while the runs ran."""
    cpu = tp.cpu_running or tp.cpu
    return {
        "client": cpu.client / tp.clients,
        "worker": (cpu.workers or 0.0) / tp.workers,
        "engine": (cpu.engine or 0.0) / tp.engines,
    }


def _busy(cpu: Cpu) -> float:
    parts = (cpu.client, cpu.workers, cpu.engine, cpu.server, cpu.other)
    return sum(p or 0.0 for p in parts)


def render_scale(report: ScaleReport) -> str:
    env = report.environment
    head = (
        "workers",
        "clients",
        "engines",
        "runs/s",
        "CPU/run",
        "p50 / p99 start to result",
        "msgs/run",
        "% of a core while running: client, worker, engine (each), server",
        "bound by",
    )
    rows = [head, *(_row(p) for p in report.points)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        f"natflow bench --scale: {env.describe()}; {report.elapsed_s:.0f} s",
        f"durability: {env.durability}",
        f"raw: sync publish round trip p50 {report.raw.publish_rtt_ms.p50:.2f} ms, "
        f"pipelined {report.raw.pipelined_msgs_per_s:,.0f} msg/s",
        "",
        *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows),
    ]
    incomplete = [p.throughput for p in report.points if _incomplete(p.throughput)]
    lines += [
        f"incomplete at {tp.workers} workers: {tp.completed} of {tp.runs} completed, "
        f"{tp.failed} failed"
        for tp in incomplete
    ]
    return "\n".join(lines)


def _incomplete(tp: Throughput) -> bool:
    return bool(tp.failed) or tp.completed < tp.runs


def _row(p: ScalePoint) -> tuple[str, ...]:
    tp = p.throughput
    per_run = tp.cpu.ms_per(tp.completed)
    shares = [*_per_process(tp).values(), (tp.cpu_running or tp.cpu).server]
    if p.saturated is None:
        bound = "unknown (server CPU not observed)"
    elif p.saturated:
        bound = f"{p.busiest} {p.busiest_pct:.0f}%"
    else:
        bound = "nothing saturated"
    return (
        str(tp.workers),
        str(tp.clients),
        str(tp.engines),
        f"{tp.runs_per_s:,.0f}",
        "n/a" if per_run is None else f"{per_run:.2f} ms",
        f"{tp.start_to_result_ms.p50:,.0f} / {tp.start_to_result_ms.p99:,.0f} ms",
        "n/a" if tp.server_msgs_per_run is None else f"{tp.server_msgs_per_run:.1f}",
        ", ".join("n/a" if s is None else f"{s:.0f}" for s in shares),
        bound,
    )
