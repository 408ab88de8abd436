"""``natflow bench``'s human table: every figure of a :class:`BenchReport`, the raw limit
measured in the same run beside it, and the target it is held to."""

from __future__ import annotations

from ._report import MIN_CPU_WINDOW, REPLAY_EVENTS, BenchReport, Cpu, Stats, Throughput


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:,.0f} ms"


def _pair(s: Stats) -> str:
    return f"{_ms(s.p50)} / {_ms(s.p99)}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} MiB"


def _cpu(cpu: Cpu) -> str:
    if cpu.window_s < MIN_CPU_WINDOW:
        return f"n/a (window {cpu.window_s:.2f} s is too short)"
    parts = [f"client {cpu.client:.0f}%"]
    if cpu.workers is not None:
        parts.append(f"workers {cpu.workers:.0f}%")
    if cpu.engine is not None:
        parts.append(f"engine {cpu.engine:.0f}%")
    if cpu.server is not None:
        parts.append(f"server {cpu.server:.0f}%")
    if cpu.other is not None:
        parts.append(f"other processes {cpu.other:.0f}%")
    return ", ".join(parts)


def _cpu_per_run(tp: Throughput) -> str:
    if tp.cpu.window_s < MIN_CPU_WINDOW:
        return "n/a (window too short)"
    per_run = tp.cpu.ms_per(tp.completed)
    return "n/a" if per_run is None else f"{per_run:.2f} ms"


def _msgs(per_run: float | None) -> str:
    return "n/a" if per_run is None else f"{per_run:.1f} in + out"


def _lag(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:,.0f} ms"


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


NEIGHBOUR_CPU = 20.0  # % of a core used by other processes that makes a run suspect


def _neighbour_warnings(report: BenchReport) -> list[str]:
    phases = (("sequential", report.sequential.cpu), ("throughput", report.throughput.cpu))
    return [
        f"warning: other processes used {cpu.other:.0f}% of a core during the {name} phase; "
        f"its figures are not representative of an idle machine"
        for name, cpu in phases
        if cpu.other is not None and cpu.other > NEIGHBOUR_CPU
    ]


def _verdict(met: bool | None) -> str:
    return {True: "ok", False: "MISSED", None: "n/a"}[met]


Row = tuple[str, str, str, str, str]


def render(report: BenchReport) -> str:
    """The human table: every figure, the raw limit measured in the same run, the target."""
    rows = [*_raw_rows(report), *_sequential_rows(report), *_throughput_rows(report)]
    rows += [*_idle_rows(report), *_replay_rows(report), *_wait_rows(report)]
    rows += _loop_rows(report)
    rows += _memory_rows(report)
    return _table(report, rows)


def _target_row(report: BenchReport, name: str, label: str, measured: str, beside: str) -> Row:
    target = next(t for t in report.targets if t.name == name)
    return (label, measured, beside, target.target, _verdict(target.met))


def _raw_rows(report: BenchReport) -> list[Row]:
    raw, rtt = report.raw, report.raw.publish_rtt_ms
    rows: list[Row] = [
        ("raw: sync publish round trip p50 / p99", _pair(rtt), "", "", ""),
        ("raw: idle round trip p50 / p99", _pair(raw.idle_publish_rtt_ms), "", "", ""),
        ("raw: pipelined publish", f"{raw.pipelined_msgs_per_s:,.0f} msg/s", "", "", ""),
    ]
    rows += [
        ("natflow: history append p50 / p99", _pair(r.append_ms), f"raw {_pair(rtt)}", "", "")
        for r in report.replay[-1:]
    ]
    return rows


def _sequential_rows(report: BenchReport) -> list[Row]:
    seq, rtt = report.sequential, report.raw.publish_rtt_ms
    return [
        _target_row(
            report,
            "sequential step p50",
            f"sequential: step p50 ({seq.steps} steps)",
            _ms(seq.step_ms.p50),
            f"raw {_ms(rtt.p50)}, {seq.p50_over_raw_rtt:.1f}x",
        ),
        _target_row(
            report,
            "sequential step p99",
            "sequential: step p99",
            _ms(seq.step_ms.p99),
            f"raw {_ms(rtt.p99)}",
        ),
        ("sequential: cpu", _cpu(seq.cpu), "", "", ""),
    ]


def _throughput_rows(report: BenchReport) -> list[Row]:
    tp, raw = report.throughput, report.raw
    workers = f"{tp.workers} worker{'s' if tp.workers > 1 else ''}"
    rows = [
        _target_row(
            report,
            "throughput, runs/s of 3 steps",
            f"throughput: {tp.runs} runs x 3 steps, {workers}",
            f"{tp.runs_per_s:,.0f} runs/s",
            "",
        ),
        ("throughput: steps/s", f"{tp.steps_per_s:,.0f} steps/s", "", "", ""),
        (
            "throughput: history appends/s",
            f"{tp.history_appends_per_s:,.0f} msg/s",
            f"raw {raw.pipelined_msgs_per_s:,.0f} msg/s pipelined",
            "",
            "",
        ),
        ("throughput: start to result p50 / p99", _pair(tp.start_to_result_ms), "", "", ""),
        ("throughput: client start rate", f"{tp.start_rate_per_s:,.0f} starts/s", "", "", ""),
        ("throughput: cpu", _cpu(tp.cpu), "", "", ""),
        _target_row(
            report,
            "throughput, cpu per run",
            "throughput: cpu per run, all processes",
            _cpu_per_run(tp),
            "",
        ),
        ("throughput: engine caught up after the last result", _lag(tp.engine_lag_s), "", "", ""),
        (
            "throughput: server messages per run, in + out",
            _msgs(tp.server_msgs_per_run),
            "",
            "",
            "",
        ),
    ]
    if tp.failed or tp.completed < tp.runs:
        rows.append(
            (
                "throughput: incomplete",
                f"{tp.completed} completed, {tp.failed} failed",
                "",
                "",
                "MISSED",
            )
        )
    return rows


def _idle_rows(report: BenchReport) -> list[Row]:
    idle, rtt = report.start_latency, report.raw.idle_publish_rtt_ms
    return [
        _target_row(
            report,
            "idle start to first step p50",
            f"idle: start to first step p50 (of {idle.samples})",
            _ms(idle.start_to_first_step_ms.p50),
            f"raw idle round trip {_ms(rtt.p50)}",
        ),
        ("idle: start to result p50 / p99", _pair(idle.start_to_result_ms), "", "", ""),
        ("idle: start() call p50 / p99", _pair(idle.start_call_ms), "", "", ""),
    ]


def _replay_rows(report: BenchReport) -> list[Row]:
    rows: list[Row] = []
    for r in report.replay:
        label = f"replay: {r.events:,} events, read + rebuild"
        detail = f"{_ms(r.read_ms)} + {_ms(r.rebuild_ms)}; cold {_ms(r.cold_ms)}"
        if r.events == REPLAY_EVENTS:
            rows.append(
                _target_row(
                    report, f"replay of {REPLAY_EVENTS:,} events", label, _ms(r.total_ms), detail
                )
            )
        else:
            rows.append((label, _ms(r.total_ms), detail, "", ""))
    return rows


def _wait_rows(report: BenchReport) -> list[Row]:
    rows: list[Row] = []
    if report.timers is not None:
        t = report.timers
        rows.append(
            _target_row(
                report,
                "timer wake-up lateness p99",
                f"timers: {t.count} sleeps of {t.sleep_s:g} s, lateness p50 / p99",
                _pair(t.lateness_ms),
                "server schedules/TTLs: 250 ms ticks (NATS.md)",
            )
        )
        fired = "exactly once each" if t.fired_once else "NOT exactly once"
        rows.append(("timers: fired", fired, f"{t.early} early", "", ""))
    if report.schedules is not None:
        s = report.schedules
        rows.append(
            (
                f"schedule every 1 s for {s.seconds:g} s: lateness p50 / p99",
                _pair(s.lateness_ms),
                f"max {_ms(s.lateness_ms.max)}",
                "",
                "",
            )
        )
        once = "exactly once each" if s.exactly_once else "NOT exactly once"
        rows.append(("schedule: fires", f"{s.runs} runs / {s.fires} fires", once, "", ""))
    if report.kill_to_restart is not None:
        k = report.kill_to_restart
        rows.append(
            _target_row(
                report,
                "kill to restart elsewhere, median",
                f"SIGKILL mid-step to restart elsewhere, median of {k.rounds}",
                _ms(k.restart_ms.p50),
                f"max {_ms(k.restart_ms.max)}",
            )
        )
    return rows


def _loop_rows(report: BenchReport) -> list[Row]:
    c = report.continue_as_new
    if c is None:
        return []
    return [
        (
            f"continue-as-new: loop of {c.steps:,} steps",
            f"{c.wall_s:,.1f} s",
            f"{c.stretches} stretches, {c.steps_per_s:,.0f} steps/s",
            "",
            "",
        ),
        _target_row(
            report,
            "replay after a kill mid-loop (continue-as-new)",
            "continue-as-new: replay after a kill mid-loop",
            _ms(c.replay_ms),
            f"{c.stretch_events_at_kill:,} events in stretch {c.killed_at_stretch}; "
            f"cold {_ms(c.replay_cold_ms)}; finished {c.resumed_s:.1f} s after",
        ),
    ]


def _memory_rows(report: BenchReport) -> list[Row]:
    seq, tp, idle = report.sequential, report.throughput, report.start_latency
    rows: list[Row] = [
        ("memory: worker peak RSS, sequential", _mib(seq.worker_peak_rss_mib), "", "", ""),
        (
            "memory: worker peak RSS, throughput",
            ", ".join(_mib(m) for m in tp.worker_peak_rss_mib),
            "",
            "",
            "",
        ),
        ("memory: worker peak RSS, idle starts", _mib(idle.worker_peak_rss_mib), "", "", ""),
    ]
    rows += [
        (f"memory: peak RSS, replay of {r.events:,}", _mib(r.peak_rss_mib), "", "", "")
        for r in report.replay
    ]
    return rows


def _table(report: BenchReport, rows: list[Row]) -> str:
    head: Row = ("figure", "measured", "raw limit (same run) / detail", "target", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    env = report.environment

    def line(row: Row) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    lines = [
        f"natflow bench: {env.describe()}; "
        f"load before {_load(env.load_before)}; {report.elapsed_s:.0f} s"
        f"{' (--quick)' if report.quick else ''}",
        f"durability: {env.durability}",
        "",
        line(head),
        "  ".join("-" * w for w in widths[:4]),
        *(line(row) for row in rows),
        "",
    ]
    lines += [f"not measured yet: {name}: {reason}" for name, reason in report.pending.items()]
    lines += _neighbour_warnings(report)
    missed = [t.name for t in report.targets if t.met is False]
    lines.append("targets missed: " + "; ".join(missed) if missed else "all targets met")
    return "\n".join(lines)
