"""Logging: natflow's text lines, or one JSON object per line (``natflow --log-json``).

Lines about a run carry its identity as ``extra`` fields (``run_id``, ``workflow``, ``step``,
``queue``, ``worker``), built with :func:`fields`. The text format shows them in the message
already; the JSON format adds them as keys, so a log pipeline can filter by run::

    {"ts": "2026-11-21T20:00:00.123+00:00", "level": "WARNING", "logger": "natflow.worker",
     "msg": "run order-1: step 'charge' failed ...", "run_id": "order-1",
     "workflow": "order", "step": "charge"}
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Final

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def fields(
    run_id: str | None = None,
    workflow: str | None = None,
    step: str | None = None,
    **more: Any,
) -> dict[str, Any]:
    """``extra`` for a log call about a run; None values are left out."""
    found = {"run_id": run_id, "workflow": workflow, "step": step, **more}
    return {key: value for key, value in found.items() if value is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and every extra field."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, default=str)


def configure_logging(level: str, *, json_lines: bool = False) -> None:
    """Log to stderr at ``level``, as text or as JSON lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
