"""Draw a natflow dashboard's panels from a live Prometheus into a PNG, without Grafana.

A stand-in for a Grafana screenshot where Grafana cannot be installed: it reads the dashboard
JSON, runs every panel's queries against Prometheus's HTTP API (``query_range`` for graphs,
``query`` for stats) with the template variables set to "All", and lays the panels out on
Grafana's 24-column grid. It needs matplotlib (``apt-get install python3-matplotlib``)::

    python3 ops/grafana/render_preview.py --prometheus http://127.0.0.1:9090 \\
        --dashboard ops/grafana/dashboards/natflow-overview.json \\
        --minutes 15 --out docs/dashboard-overview-preview.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

BG, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#5794f2", "#ff9830", "#f2495c", "#b877d9", "#8ab8ff", "#fade2a"]
ROW_PX, COL_PX = 30, 64  # Grafana's grid: 30 px per row unit; a 1536 px wide dashboard
NAMED = {
    "green": "#73bf69",
    "orange": "#ff9830",
    "red": "#f2495c",
    "blue": "#5794f2",
    "yellow": "#fade2a",
    "purple": "#b877d9",
}


def fetch(base: str, path: str, **params: Any) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = json.loads(response.read())
    if body["status"] != "success":
        raise RuntimeError(f"{params.get('query')}: {body.get('error')}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text.strip() or ", ".join(f"{k}={v}" for k, v in labels.items()) or "value"


def human(value: float, unit: str, decimals: int | None = None) -> str:
    """``value`` as Grafana shows it in ``unit`` (the units natflow's dashboards use)."""
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        if decimals is None and 0 < abs(value) < 0.01:
            return f"{value * 100:.2g}%"  # a small share still reads as more than zero
        return f"{value * 100:.{1 if decimals is None else decimals}f}%"
    if unit == "s":
        if value >= 60:
            return f"{value / 60:.1f} min"
        if value >= 1 or value == 0:
            return f"{value:.{2 if decimals is None else min(decimals, 2)}f} s"
        return f"{value * 1000:.1f} ms"
    if unit == "ops":
        return f"{value:.2f}/s"
    if unit == "bytes":
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= size:
                return f"{value / size:.1f} {name}"
        return f"{value:.0f} B"
    if unit.startswith("suffix:"):
        return f"{value:.{1 if decimals is None else decimals}f}{unit[len('suffix:') :].strip()}"
    if decimals is not None:
        return f"{value:.{decimals}f}"
    return f"{value:.4g}"


def threshold_color(defaults: dict[str, Any], value: float) -> str:
    """The colour of the last threshold step at or below ``value`` (Grafana's rule)."""
    steps = defaults.get("thresholds", {}).get("steps", [])
    color = "green"
    for step in steps:
        if step["value"] is None or (not math.isnan(value) and value >= step["value"]):
            color = step["color"]
    return NAMED.get(color, color)


def override_color(panel: dict[str, Any], label: str) -> str | None:
    """A fixed colour from the panel's by-regexp overrides, if one matches ``label``."""
    for override in panel["fieldConfig"].get("overrides", []):
        matcher = override["matcher"]
        if matcher["id"] == "byRegexp" and re.fullmatch(matcher["options"], label):
            for prop in override["properties"]:
                if prop["id"] == "color":
                    fixed: str = prop["value"]["fixedColor"]
                    return NAMED.get(fixed, fixed)
    return None


def draw_series(
    ax: Any,
    panel: dict[str, Any],
    base: str,
    window: tuple[float, float, float],
    variables: dict[str, str],
) -> None:
    start, end, step = window
    stack = panel["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode")
    unit = panel["fieldConfig"]["defaults"].get("unit", "short")
    below = None
    color = 0
    for target in panel["targets"]:
        expr = substitute(target["expr"], variables)
        for series in fetch(base, "query_range", query=expr, start=start, end=end, step=step):
            xs = [(float(t) - end) / 60 for t, _ in series["values"]]
            ys = [float(v) for _, v in series["values"]]
            label = legend(target.get("legendFormat", ""), series["metric"])
            c = override_color(panel, label) or COLORS[color % len(COLORS)]
            color += 1
            if stack == "normal":
                base_ys = below if below and len(below) == len(ys) else [0.0] * len(ys)
                top = [a + b for a, b in zip(base_ys, ys, strict=True)]
                ax.fill_between(xs, base_ys, top, color=c, alpha=0.35, linewidth=0)
                ax.plot(xs, top, color=c, linewidth=1.2, label=label)
                below = top
            else:
                ax.plot(xs, ys, color=c, linewidth=1.4, label=label)
    ax.set_facecolor(PANEL)
    ax.grid(color=GRID, linewidth=0.6)
    ax.tick_params(colors=TEXT, labelsize=7)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.yaxis.set_major_formatter(lambda v, _: human(v, unit))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0f} min")
    if color:
        ax.legend(loc="upper left", fontsize=6.5, frameon=False, labelcolor=TEXT, ncol=2)
    else:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center", transform=ax.transAxes)


def draw_stat(
    ax: Any,
    panel: dict[str, Any],
    base: str,
    window: tuple[float, float, float],
    variables: dict[str, str],
) -> None:
    start, end, step = window
    defaults = panel["fieldConfig"]["defaults"]
    unit = defaults.get("unit", "short")
    expr = substitute(panel["targets"][0]["expr"], variables)
    now = fetch(base, "query", query=expr, time=end)
    value = float(now[0]["value"][1]) if now else float("nan")
    color = threshold_color(defaults, value)
    history = fetch(base, "query_range", query=expr, start=start, end=end, step=step)
    ax.set_facecolor(PANEL)
    if history:
        xs = [float(t) for t, _ in history[0]["values"]]
        ys = [float(v) for _, v in history[0]["values"]]
        finite = [y for y in ys if not math.isnan(y)]
        if finite and max(finite) > min(finite):
            ax.fill_between(xs, min(finite), ys, color=color, alpha=0.15, linewidth=0)
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    shown = (
        human(value, unit, defaults.get("decimals"))
        if now and not math.isnan(value)
        else defaults.get("noValue", "No data")
    )
    ax.text(
        0.5,
        0.45,
        shown,
        color=color if now and not math.isnan(value) else TEXT,
        fontsize=20,
        fontweight="bold",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )


def render(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads(Path(args.dashboard).read_text())
    variables = {"__rate_interval": args.rate_interval, "datasource": "prometheus"}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            variables[var["name"]] = ".*"
    end = args.end or time.time()
    window = (end - args.minutes * 60, end, max(5.0, args.minutes * 60 / 240))
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    title_px = 70
    width, height = 24 * COL_PX, rows * ROW_PX + title_px
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, facecolor=BG)
    fig.text(0.01, 1 - 28 / height, board["title"], color=TEXT, fontsize=15, fontweight="bold")
    fig.text(
        0.01,
        1 - 52 / height,
        f"last {args.minutes} min, workflow = All, queue = All  ·  drawn from Prometheus by "
        "ops/grafana/render_preview.py (a preview: Grafana was not available)",
        color="#8e8e8e",
        fontsize=8,
    )
    for panel in panels:
        g = panel["gridPos"]
        left, right = g["x"] * COL_PX + 4, (g["x"] + g["w"]) * COL_PX - 4
        top, bottom = title_px + g["y"] * ROW_PX + 4, title_px + (g["y"] + g["h"]) * ROW_PX - 4
        if panel["type"] == "row":
            fig.text(
                left / width,
                1 - (top + 14) / height,
                panel["title"],
                color=TEXT,
                fontsize=10,
                fontweight="bold",
            )
            continue
        header = 22
        fig.patches.append(
            plt.Rectangle(
                (left / width, 1 - bottom / height),
                (right - left) / width,
                (bottom - top) / height,
                transform=fig.transFigure,
                color=PANEL,
                zorder=-1,
            )
        )
        fig.text(
            (left + 8) / width, 1 - (top + 15) / height, panel["title"], color=TEXT, fontsize=8.5
        )
        pad_x, pad_b = (60, 22) if panel["type"] == "timeseries" else (8, 6)
        ax = fig.add_axes(
            (
                (left + pad_x) / width,
                1 - (bottom - pad_b) / height,
                (right - left - pad_x - 8) / width,
                (bottom - top - header - pad_b) / height,
            )
        )
        if panel["type"] == "stat":
            draw_stat(ax, panel, args.prometheus, window, variables)
        else:
            draw_series(ax, panel, args.prometheus, window, variables)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, facecolor=BG)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument(
        "--dashboard", default=str(Path(__file__).parent / "dashboards" / "natflow-overview.json")
    )
    parser.add_argument("--minutes", type=int, default=15)
    parser.add_argument("--end", type=float, default=None, help="unix time (default: now)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes")
    parser.add_argument("--out", default="dashboard-preview.png")
    render(parser.parse_args())


if __name__ == "__main__":
    main()
