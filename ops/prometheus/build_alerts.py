"""Writes natflow's Prometheus alert rules (``natflow-alerts.yml``) from the definitions below.

Edit this script and run it again rather than editing the YAML by hand::

    python ops/prometheus/build_alerts.py

Thresholds, windows and ``for:`` durations are parameters (:class:`Tuning`), so the rules can
be tuned in one place, and so ``tests/test_alerts.py`` can load a copy with short durations and
watch each alert fire against a real Prometheus. Every expression uses only metrics natflow
exports (the engine's and workers' ``/metrics``, and Prometheus's own ``up``).
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "natflow-alerts.yml"


@dataclass(frozen=True)
class Tuning:
    """The numbers in the rules. The defaults are what natflow ships."""

    down_for: str = "1m"  # a scrape target down this long
    no_worker_for: str = "2m"  # work waiting with no live worker this long
    pending_seconds: float = 300.0  # a run no worker has taken for longer than this ...
    pending_for: str = "1m"  # ... for this long
    dead_letter_window: str = "15m"  # dead letters added within this window
    timer_target_seconds: float = 1.0  # p99 timer lateness above this ...
    timer_window: str = "5m"
    timer_for: str = "5m"  # ... for this long
    near_limit_ratio: float = 0.9  # a stream or the server's storage this full ...
    near_limit_for: str = "5m"  # ... for this long
    backlog_for: str = "10m"
    failure_window: str = "15m"
    failure_for: str = "15m"
    blocked_for: str = "1m"
    dying_window: str = "15m"


@dataclass(frozen=True)
class Rule:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str


def rules(t: Tuning) -> list[Rule]:
    pct = f"{t.near_limit_ratio:.0%}"
    return [
        Rule(
            "NatflowEngineDown",
            'up{job="natflow-engine"} == 0',
            t.down_for,
            "critical",
            "The natflow engine at {{ $labels.instance }} is down",
            "Prometheus cannot scrape the engine at {{ $labels.instance }}. Without an engine, "
            "timers do not fire, signals are not taken in, dead workers' runs are not handed "
            "back and `natflow runs list` goes stale: start `natflow engine` (or `natflow dev`).",
        ),
        Rule(
            "NatflowWorkerDown",
            'up{job="natflow-worker"} == 0',
            t.down_for,
            "warning",
            "The natflow worker at {{ $labels.instance }} is down",
            "Prometheus cannot scrape the worker process at {{ $labels.instance }}; its runs "
            "move to the other workers of its queues. If it was retired on purpose, remove it "
            "from the scrape targets.",
        ),
        Rule(
            "NatflowNoLiveWorkers",
            "(\n  max by (queue) (natflow_queue_runs_pending) > 0\n  or\n"
            "  max by (queue) (natflow_queue_tasks_pending) > 0\n)\n"
            "unless on (queue)\nmax by (queue) (natflow_workers_live) > 0",
            t.no_worker_for,
            "critical",
            "Queue {{ $labels.queue }} has work but no live worker",
            "Runs or tasks wait on queue {{ $labels.queue }} and no registered worker serves "
            "it: start one (`natflow worker ... --queue {{ $labels.queue }}`).",
        ),
        Rule(
            "NatflowRunsPendingTooLong",
            f"max by (queue) (natflow_queue_oldest_pending_run_seconds) > {t.pending_seconds:g}",
            t.pending_for,
            "warning",
            f"Runs on queue {{{{ $labels.queue }}}} wait over {t.pending_seconds:g} s for a worker",
            "The oldest run that no worker has taken on queue {{ $labels.queue }} has waited "
            "{{ $value | humanizeDuration }}: are its workers alive, saturated "
            "(--max-concurrent-runs), or serving other workflows? `natflow runs list "
            "--status pending` shows them.",
        ),
        Rule(
            "NatflowDeadLettersGrowing",
            'sum(increase(natflow_signals_rejected_total{by="engine"}'
            f"[{t.dead_letter_window}])) > 0",
            "0m",
            "warning",
            "Signals are being dead-lettered",
            f"{{{{ $value }}}} signals went to NATFLOW_DEADLETTER in {t.dead_letter_window} "
            "(unknown or finished runs, bad subjects, bodies that are not JSON); `natflow "
            "signals dead` lists them with the reason.",
        ),
        Rule(
            "NatflowTimersLate",
            "histogram_quantile(0.99, sum by (le) "
            f"(rate(natflow_timer_lateness_seconds_bucket[{t.timer_window}])))\n"
            f"> {t.timer_target_seconds:g}",
            t.timer_for,
            "warning",
            "Timers wake their runs late",
            "The 99th percentile of timer lateness is {{ $value | humanizeDuration }}, over "
            f"the {t.timer_target_seconds:g} s target (natflow's own is about 10 ms): is an "
            "engine running, and is it keeping up?",
        ),
        Rule(
            "NatflowJetStreamStreamNearLimit",
            # Each ratio under its own `limit` label: `or` keeps a right-hand series only
            # where no left-hand one has the same labels, so with both limits set the
            # messages' ratio was dropped.
            "max by (account, stream) (\n"
            "  label_replace(natflow_jetstream_stream_bytes / natflow_jetstream_stream_max_bytes"
            ', "limit", "bytes", "", "")\n  or\n'
            "  label_replace(natflow_jetstream_stream_messages / "
            'natflow_jetstream_stream_max_messages, "limit", "messages", "", "")\n)\n'
            f"> {t.near_limit_ratio:g}",
            t.near_limit_for,
            "warning",
            f"JetStream stream {{{{ $labels.stream }}}} is over {pct} of its limits",
            "Stream {{ $labels.stream }} holds {{ $value | humanizePercentage }} of its "
            "max_bytes or max_msgs; at the limit it discards messages or refuses new ones. "
            "Raise the limit, or shorten retention.",
        ),
        Rule(
            "NatflowJetStreamStorageNearLimit",
            "max(natflow_jetstream_storage_bytes / natflow_jetstream_storage_limit_bytes)\n"
            f"> {t.near_limit_ratio:g}",
            t.near_limit_for,
            "critical",
            f"The NATS server's JetStream storage is over {pct} full",
            "JetStream uses {{ $value | humanizePercentage }} of the server's max_file_store; "
            "when it is full, appends to history fail and runs stop. Raise max_file_store, "
            "add disk, or shorten retention.",
        ),
        Rule(
            "NatflowWorkPilingUp",
            "max by (queue) (natflow_queue_tasks_pending) > 100\nand\n"
            f"max by (queue) (delta(natflow_queue_tasks_pending[{t.backlog_for}])) > 0",
            t.backlog_for,
            "warning",
            "Work is piling up on queue {{ $labels.queue }}",
            f"{{{{ $value }}}} tasks wait on queue {{{{ $labels.queue }}}} and the backlog grew "
            f"over the last {t.backlog_for}: add workers, raise --max-concurrent-runs, or look "
            "for slow steps.",
        ),
        Rule(
            "NatflowRunFailureRatio",
            "sum by (workflow) "
            f'(rate(natflow_runs_closed_total{{status="failed"}}[{t.failure_window}]))\n/\n'
            f"sum by (workflow) (rate(natflow_runs_closed_total[{t.failure_window}]))\n> 0.1",
            t.failure_for,
            "warning",
            "More than 10% of {{ $labels.workflow }} runs fail",
            "{{ $value | humanizePercentage }} of the runs of workflow {{ $labels.workflow }} "
            f"that ended in the last {t.failure_window} failed; `natflow runs list --workflow "
            "{{ $labels.workflow }} --status failed` shows them.",
        ),
        Rule(
            "NatflowRunsBlocked",
            'max by (workflow) (natflow_runs{status="blocked"}) > 0',
            t.blocked_for,
            "warning",
            "{{ $value }} runs of {{ $labels.workflow }} are blocked",
            "Replaying these runs diverged from their history (a code change that is not "
            "deterministic); they wait for compatible code. `natflow runs list --status "
            "blocked` lists them.",
        ),
        Rule(
            "NatflowWorkersDying",
            "sum by (queue) "
            f'(increase(natflow_lease_takeovers_total{{kind="reaped"}}[{t.dying_window}])) > 10',
            "0m",
            "warning",
            "Workers of queue {{ $labels.queue }} keep dying",
            "The engine handed back {{ $value }} runs of dead workers in the last "
            f"{t.dying_window}.",
        ),
    ]


def _block(text: str, indent: str) -> str:
    """A YAML literal block scalar (``|-``): kept exactly, quotes and braces included."""
    return "|-\n" + "\n".join(indent + line for line in text.splitlines())


def _folded(text: str, indent: str) -> str:
    """A YAML folded block scalar (``>-``): one line of text, wrapped to read."""
    lines = textwrap.wrap(text, width=96 - len(indent), break_on_hyphens=False)
    return ">-\n" + "\n".join(indent + line for line in lines)


def render(t: Tuning = Tuning()) -> str:
    """The rules file's text for these numbers."""
    out = [
        "# natflow's alert rules, written by ops/prometheus/build_alerts.py: edit that and run",
        "# it again. Gauges read from JetStream (natflow_queue_*, natflow_workers_live,",
        "# natflow_runs, natflow_jetstream_*) are exported by every engine replica alike, hence",
        "# `max by (...)` rather than `sum`.",
        "groups:",
        "  - name: natflow",
        "    rules:",
    ]
    for rule in rules(t):
        out += [
            f"      - alert: {rule.alert}",
            f"        expr: {_block(rule.expr, ' ' * 10)}",
            f"        for: {rule.for_}",
            "        labels:",
            f"          severity: {rule.severity}",
            "        annotations:",
            f"          summary: {_folded(rule.summary, ' ' * 12)}",
            f"          description: {_folded(rule.description, ' ' * 12)}",
            "",
        ]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT.relative_to(HERE.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
