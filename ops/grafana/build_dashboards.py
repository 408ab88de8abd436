"""Writes natflow's Grafana dashboards (``dashboards/*.json``) from the definitions below.

The JSON files are what Grafana loads (see ``provisioning/``); edit this script and run it
again rather than editing them by hand::

    python ops/grafana/build_dashboards.py

Every query uses only metrics natflow exports; ``tests/test_metrics.py`` runs each one against
a real Prometheus that scraped a real engine and worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
WF = 'workflow=~"$workflow"'
Q = 'queue=~"$queue"'
RATE = "$__rate_interval"

Target = tuple[str, str]  # (expr, legend)


class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    def __init__(self) -> None:
        self.x = self.y = self.row_h = 0
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_h = 0, self.y + 1, 0


def _targets(targets: list[Target]) -> list[dict[str, Any]]:
    return [
        {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
        for i, (expr, legend) in enumerate(targets)
    ]


# Colours that mean something: green is healthy, orange needs a look, red needs action (the
# red steps match the alert rules in ops/prometheus); blue is a plain quantity, neither.
GREEN, ORANGE, RED, BLUE = "green", "orange", "red", "blue"
Steps = list[tuple[float | None, str]]  # (from this value on, colour); the first is the base


def thresholds(steps: Steps) -> dict[str, Any]:
    return {
        "mode": "absolute",
        "steps": [{"value": value, "color": color} for value, color in steps],
    }


def stat(
    title: str,
    expr: str,
    unit: str,
    steps: Steps,
    description: str,
    *,
    decimals: int = 0,
    no_value: str = "0",
) -> dict[str, Any]:
    """A single number, coloured by ``steps`` (every stat has a unit and thresholds)."""
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets([(expr, "")]),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "decimals": decimals,
                "noValue": no_value,
                "color": {"mode": "thresholds"},
                "thresholds": thresholds(steps),
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def colored(pattern: str, color: str) -> dict[str, Any]:
    """A series override: every series whose name matches ``pattern`` gets ``color``."""
    return {
        "matcher": {"id": "byRegexp", "options": pattern},
        "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}],
    }


# Run statuses: running green, waiting and sleeping calm, pending yellow, blocked red.
STATUS_COLORS = [
    colored("running", GREEN),
    colored("pending", "yellow"),
    colored("sleeping", "purple"),
    colored("waiting", BLUE),
    colored("blocked", RED),
]

# Run and step outcomes keep one colour on every graph.
OUTCOME_COLORS = [
    colored(".*started$", BLUE),
    colored(".*completed$", GREEN),
    colored(".*failed$", RED),
    colored(".*(cancelled|terminated)$", ORANGE),
]


def series(
    title: str,
    targets: list[Target],
    unit: str = "short",
    *,
    stack: bool = False,
    description: str = "",
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": _targets(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 20 if stack else 5,
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "showPoints": "never",
                },
            },
            "overrides": overrides or [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def quantiles(
    metric: str, selector: str, by: str, q: tuple[float, ...] = (0.5, 0.95)
) -> list[Target]:
    grouping = f"le, {by}" if by else "le"
    braces = f"{{{selector}}}" if selector else ""
    label = "".join(f"{{{{{b.strip()}}}}} " for b in by.split(",") if b.strip())
    return [
        (
            f"histogram_quantile({p}, sum by ({grouping}) (rate({metric}_bucket{braces}[{RATE}])))",
            f"{label}p{round(p * 100)}",
        )
        for p in q
    ]


def variable(name: str, label: str, metric: str) -> dict[str, Any]:
    query = f"label_values({metric}, {name})"
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
    }


DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Data source",
    "type": "datasource",
    "query": "prometheus",
    "current": {},
    "hide": 0,
    "refresh": 1,
}


def dashboard(
    uid: str, title: str, description: str, layout: Layout, variables: list[str]
) -> dict[str, Any]:
    known = {
        "workflow": variable("workflow", "Workflow", "natflow_runs_started_total"),
        "queue": variable("queue", "Queue", "natflow_queue_tasks_pending"),
        "step": variable("step", "Step", 'natflow_steps_total{workflow=~"$workflow"}'),
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["natflow"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [DATASOURCE_VARIABLE, *(known[v] for v in variables)]},
        "annotations": {"list": []},
        "links": [
            {"type": "dashboards", "tags": ["natflow"], "asDropdown": True, "title": "natflow"}
        ],
        "panels": layout.panels,
    }


# -- the dashboards ------------------------------------------------------------------------------


def overview() -> dict[str, Any]:
    lay = Layout()
    lay.add(
        stat(
            "Runs started / min",
            f"sum(rate(natflow_runs_started_total{{{WF}}}[{RATE}])) * 60",
            "suffix: /min",
            [(None, BLUE)],
            "Runs started per minute, from the engine's reading of history (a quantity, "
            "neither good nor bad).",
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Failed runs (15 min)",
            "max(sum by (workflow) "
            f'(increase(natflow_runs_closed_total{{{WF},status="failed"}}[15m])) '
            "/ clamp_min(sum by (workflow) "
            f"(increase(natflow_runs_closed_total{{{WF}}}[15m])), 1)) or vector(0)",
            "percentunit",
            [(None, GREEN), (0.01, ORANGE), (0.1, RED)],
            "The largest share of failed runs among the workflows' runs that ended in the last "
            "15 minutes (red from 10%, where NatflowRunFailureRatio fires for that workflow).",
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Task backlog",
            f"sum(max by (queue) (natflow_queue_tasks_pending{{{Q}}}))",
            "short",
            [(None, GREEN), (20, ORANGE), (100, RED)],
            "Tasks waiting for a worker, over the selected queues (red from 100, where "
            "NatflowWorkPilingUp looks).",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Queues with work, no worker",
            f"count((max by (queue) (natflow_queue_runs_pending{{{Q}}}) > 0 or max by (queue) "
            f"(natflow_queue_tasks_pending{{{Q}}}) > 0) unless on (queue) max by (queue) "
            f"(natflow_workers_live{{{Q}}}) > 0) or vector(0)",
            "short",
            [(None, GREEN), (1, RED)],
            "Selected queues where runs or tasks wait and no live worker serves them (red from "
            "1, where NatflowNoLiveWorkers fires). A total of live workers would stay green "
            "while one queue has none.",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Blocked runs",
            f'sum(max by (workflow) (natflow_runs{{{WF},status="blocked"}}))',
            "short",
            [(None, GREEN), (1, RED)],
            "Runs held because a replay diverged from history: each one needs a deploy.",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Timer lateness p99 (15 min)",
            "histogram_quantile(0.99, sum by (le) "
            "(rate(natflow_timer_lateness_seconds_bucket[15m])))",
            "s",
            [(None, GREEN), (0.25, ORANGE), (1.0, RED)],
            "How late the engine wakes runs whose timer came due (red over 1 s, the target "
            "of NatflowTimersLate; natflow's own is about 10 ms).",
            decimals=3,
            no_value="no timers",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Runs ended / min",
            f"sum(rate(natflow_runs_closed_total{{{WF}}}[{RATE}])) * 60",
            "suffix: /min",
            [(None, BLUE)],
            "Runs that ended per minute, whatever the outcome.",
            decimals=1,
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Oldest run waiting for a worker",
            f"max(natflow_queue_oldest_pending_run_seconds{{{Q}}})",
            "s",
            [(None, GREEN), (60, ORANGE), (300, RED)],
            "How long the oldest run that no worker has taken has waited (red from 5 minutes, "
            "where NatflowRunsPendingTooLong fires).",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Runs in flight",
            f"sum(max by (queue) (natflow_queue_tasks_ack_pending{{{Q}}}))",
            "short",
            [(None, BLUE)],
            "Runs a worker holds right now (tasks delivered and not yet acknowledged).",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Step retries (15 min)",
            f"sum(increase(natflow_step_retries_total{{{WF}}}[15m]))",
            "short",
            [(None, GREEN), (1, ORANGE)],
            "Step attempts that failed and were retried: expected now and then, worth a look "
            "when they climb.",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "Dead-lettered signals (15 min)",
            'sum(increase(natflow_signals_rejected_total{by="engine"}[15m]))',
            "short",
            [(None, GREEN), (1, ORANGE)],
            "Signals the engine could not deliver (unknown or finished run, bad subject or "
            "body); `natflow signals dead` lists them.",
        ),
        4,
        4,
    )
    lay.add(
        stat(
            "JetStream storage used",
            "max(natflow_jetstream_storage_bytes / natflow_jetstream_storage_limit_bytes)",
            "percentunit",
            [(None, GREEN), (0.75, ORANGE), (0.9, RED)],
            "File storage JetStream uses, of the server's max_file_store (red from 90%, where "
            "NatflowJetStreamStorageNearLimit fires). Needs the engine's --nats-monitor.",
            decimals=2,
        ),
        4,
        4,
    )
    lay.row("Runs")
    lay.add(
        series(
            "Runs started and ended",
            [
                (f"sum(rate(natflow_runs_started_total{{{WF}}}[{RATE}]))", "started"),
                (
                    f"sum by (status) (rate(natflow_runs_closed_total{{{WF}}}[{RATE}]))",
                    "{{status}}",
                ),
            ],
            "ops",
            overrides=OUTCOME_COLORS,
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Live runs by status",
            [
                (
                    f"sum by (status) (max by (workflow, status) "
                    f'(natflow_runs{{{WF},status!~"completed|failed|cancelled|terminated"}}))',
                    "{{status}}",
                )
            ],
            stack=True,
            description="Runs not yet ended, from the run index (refreshed every 30 s).",
            overrides=STATUS_COLORS,
        ),
        12,
        8,
    )
    lay.add(
        series("Run duration", quantiles("natflow_run_duration_seconds", WF, "workflow"), "s"),
        12,
        8,
    )
    lay.add(
        series(
            "Step duration (per attempt)",
            quantiles("natflow_step_duration_seconds", WF, "workflow"),
            "s",
        ),
        12,
        8,
    )
    lay.row("Queues and workers")
    lay.add(
        series(
            "Tasks waiting and in flight",
            [
                (f"max by (queue) (natflow_queue_tasks_pending{{{Q}}})", "{{queue}} waiting"),
                (
                    f"max by (queue) (natflow_queue_tasks_ack_pending{{{Q}}})",
                    "{{queue}} in flight",
                ),
            ],
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Schedule-to-start (tasks)",
            quantiles("natflow_task_schedule_to_start_seconds", Q, "queue"),
            "s",
            description="From a task being enqueued to a worker taking it.",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Takeovers and fenced writes",
            [
                (
                    f"sum by (kind) (increase(natflow_lease_takeovers_total{{{Q}}}[{RATE}]))",
                    "takeover: {{kind}}",
                ),
                (
                    f"sum by (write) (increase(natflow_fenced_writes_total{{{WF}}}[{RATE}]))",
                    "fenced: {{write}}",
                ),
            ],
            description="Runs moved off dead or stalled workers, and workers stepping back.",
        ),
        8,
        8,
    )
    lay.row("Timers and signals")
    lay.add(
        series(
            "Timer lateness",
            quantiles("natflow_timer_lateness_seconds", "", "", (0.5, 0.99)),
            "s",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Timers fired and pending",
            [
                # Every engine replica wakes every timer: max, not sum (two engines doubled it).
                (f"max(rate(natflow_timers_fired_total[{RATE}]))", "fired / s"),
                ("max(natflow_timers_pending)", "pending"),
            ],
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Signals",
            [
                (f"sum(rate(natflow_signals_received_total{{{WF}}}[{RATE}]))", "received"),
                (f"sum(rate(natflow_signals_delivered_total{{{WF}}}[{RATE}]))", "delivered"),
                (
                    f"sum by (by) (rate(natflow_signals_rejected_total[{RATE}]))",
                    "rejected by {{by}}",
                ),
            ],
            "ops",
            overrides=[colored("rejected.*", ORANGE)],
        ),
        8,
        8,
    )
    lay.row("JetStream")
    lay.add(
        series(
            "Stream size",
            [
                (
                    "max by (stream) (natflow_jetstream_stream_bytes)",
                    "{{stream}}",
                )
            ],
            "bytes",
            description="Bytes each JetStream stream stores (KV buckets are streams too), "
            "from nats-server's /jsz.",
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Storage used of the limit",
            [
                (
                    "max(natflow_jetstream_storage_bytes / natflow_jetstream_storage_limit_bytes)",
                    "file storage",
                ),
                (
                    "max by (stream) (natflow_jetstream_stream_bytes) "
                    "/ scalar(max(natflow_jetstream_storage_limit_bytes))",
                    "{{stream}}",
                ),
            ],
            "percentunit",
            description="The server's JetStream file storage used, of its max_file_store, and "
            "each stream's share of that limit. (A stream with its own max_bytes or max_msgs "
            "near it fires NatflowJetStreamStreamNearLimit.)",
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Appends written in atomic batches",
            [
                (
                    f"sum by (stream) (rate(natflow_appends_batched_total[{RATE}]))",
                    "{{stream}} appends",
                ),
                (
                    f"sum by (stream) (rate(natflow_append_batches_total[{RATE}]))",
                    "{{stream}} batches",
                ),
            ],
            "ops",
            description="Appends of many runs sent as one atomic batch (one fsync and one "
            "acknowledgement), per second, and the batches that carried them: their ratio is "
            "the mean batch size. History is batched unless the engine recorded that the "
            "server does not fsync each write (README, Durability): then NATFLOW_HISTORY shows "
            "none, and its appends go one by one.",
        ),
        24,
        8,
    )
    return dashboard(
        "natflow-overview",
        "natflow overview",
        "Is work piling up, are runs failing, are workers alive, are timers late.",
        lay,
        ["workflow", "queue"],
    )


def workflows() -> dict[str, Any]:
    lay = Layout()
    lay.row("Runs by workflow")
    lay.add(
        series(
            "Runs started",
            [
                (
                    f"sum by (workflow) (rate(natflow_runs_started_total{{{WF}}}[{RATE}]))",
                    "{{workflow}}",
                )
            ],
            "ops",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Runs ended",
            [
                (
                    f"sum by (workflow, status) (rate(natflow_runs_closed_total{{{WF}}}[{RATE}]))",
                    "{{workflow}} {{status}}",
                )
            ],
            "ops",
            overrides=OUTCOME_COLORS,
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Failure ratio (15 min)",
            [
                (
                    "sum by (workflow) "
                    f'(increase(natflow_runs_closed_total{{{WF},status="failed"}}[15m])) '
                    "/ clamp_min(sum by (workflow) "
                    f"(increase(natflow_runs_closed_total{{{WF}}}[15m])), 1)",
                    "{{workflow}}",
                )
            ],
            "percentunit",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Run duration p95",
            quantiles("natflow_run_duration_seconds", WF, "workflow, status", (0.95,)),
            "s",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Runs by status",
            [
                (
                    f"max by (workflow, status) (natflow_runs{{{WF}}}) > 0",
                    "{{workflow}} {{status}}",
                )
            ],
            description="From the run index: every run it holds, ended ones included.",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Non-determinism errors",
            [
                (
                    "sum by (workflow) "
                    f"(increase(natflow_nondeterminism_errors_total{{{WF}}}[{RATE}]))",
                    "{{workflow}}",
                ),
                (
                    f'max by (workflow) (natflow_runs{{{WF},status="blocked"}})',
                    "{{workflow}} blocked now",
                ),
            ],
        ),
        8,
        8,
    )
    step = f'{WF},step=~"$step"'
    lay.row("Steps")
    lay.add(
        series(
            "Step outcomes",
            [
                (
                    "sum by (workflow, step, outcome) "
                    f"(rate(natflow_steps_total{{{step}}}[{RATE}]))",
                    "{{workflow}}.{{step}} {{outcome}}",
                )
            ],
            "ops",
            overrides=OUTCOME_COLORS,
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Step retries",
            [
                (
                    "sum by (workflow, step) "
                    f"(increase(natflow_step_retries_total{{{step}}}[{RATE}]))",
                    "{{workflow}}.{{step}}",
                )
            ],
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Step duration p95 (per attempt)",
            quantiles("natflow_step_duration_seconds", step, "workflow, step", (0.95,)),
            "s",
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Step schedule-to-start p95",
            quantiles("natflow_step_schedule_to_start_seconds", step, "workflow, step", (0.95,)),
            "s",
            description="From the workflow issuing a step (or its retry coming due) to its body "
            "starting: time spent waiting for a step slot.",
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Worker executions by outcome",
            [
                (
                    f"sum by (outcome) (rate(natflow_run_executions_total{{{WF}}}[{RATE}]))",
                    "{{outcome}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Signals by workflow",
            [
                (
                    f"sum by (workflow) (rate(natflow_signals_received_total{{{WF}}}[{RATE}]))",
                    "{{workflow}} received",
                ),
                (
                    f"sum by (workflow) (rate(natflow_signals_delivered_total{{{WF}}}[{RATE}]))",
                    "{{workflow}} delivered",
                ),
            ],
            "ops",
        ),
        12,
        8,
    )
    return dashboard(
        "natflow-workflows",
        "natflow workflows and steps",
        "Per workflow and step: throughput, failures, durations, retries, blocked runs.",
        lay,
        ["workflow", "step"],
    )


def workers() -> dict[str, Any]:
    lay = Layout()
    lay.row("Queues")
    lay.add(
        series(
            "Live workers",
            [(f"max by (queue) (natflow_workers_live{{{Q}}})", "{{queue}}")],
            description="Registered workers serving the queue and not draining.",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Backlog (tasks waiting)",
            [(f"max by (queue) (natflow_queue_tasks_pending{{{Q}}})", "{{queue}}")],
        ),
        8,
        8,
    )
    lay.add(
        series(
            "In flight and redelivered",
            [
                (f"max by (queue) (natflow_queue_tasks_ack_pending{{{Q}}})", "{{queue}} in flight"),
                (
                    f"max by (queue) (natflow_queue_tasks_redelivered{{{Q}}})",
                    "{{queue}} redelivered",
                ),
            ],
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Idle pull requests",
            [(f"max by (queue) (natflow_queue_pull_requests_waiting{{{Q}}})", "{{queue}}")],
            description="Workers' pull requests waiting for a task: spare capacity.",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Schedule-to-start (tasks)",
            quantiles("natflow_task_schedule_to_start_seconds", Q, "queue", (0.5, 0.95, 0.99)),
            "s",
        ),
        8,
        8,
    )
    lay.add(
        series(
            "Lease takeovers",
            [
                (
                    "sum by (queue, kind) "
                    f"(increase(natflow_lease_takeovers_total{{{Q}}}[{RATE}]))",
                    "{{queue}} {{kind}}",
                )
            ],
            description="reaped: the engine handed a dead worker's run back; redelivered: a "
            "worker claimed a run whose task came back from another worker.",
        ),
        8,
        8,
    )
    lay.row("Workers")
    lay.add(
        series(
            "Runs held per worker process",
            [("sum by (instance) (natflow_worker_runs_held)", "{{instance}}")],
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Fenced writes (stepping back)",
            [
                (
                    f"sum by (write) (increase(natflow_fenced_writes_total[{RATE}]))",
                    "{{write}}",
                )
            ],
            description="Writes refused because another worker holds the run.",
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Executions by outcome",
            [
                (
                    f"sum by (outcome) (rate(natflow_run_executions_total[{RATE}]))",
                    "{{outcome}}",
                )
            ],
            "ops",
            stack=True,
        ),
        12,
        8,
    )
    lay.add(
        series(
            "Timers pending and fired",
            [
                ("max(natflow_timers_pending)", "pending"),
                (f"max(rate(natflow_timers_fired_total[{RATE}]))", "fired / s"),
            ],
        ),
        12,
        8,
    )
    return dashboard(
        "natflow-workers",
        "natflow workers and queues",
        "Queues (backlog, in flight, lag) and the workers that serve them.",
        lay,
        ["queue"],
    )


def main() -> None:
    out = HERE / "dashboards"
    out.mkdir(exist_ok=True)
    for name, board in (
        ("natflow-overview", overview()),
        ("natflow-workflows", workflows()),
        ("natflow-workers", workers()),
    ):
        (out / f"{name}.json").write_text(json.dumps(board, indent=2) + "\n")
        print(f"wrote {out / name}.json")


if __name__ == "__main__":
    main()
