"""Bounds on the text a run records: an error's message and traceback, a reason."""

from __future__ import annotations

from natflow_engine import MAX_REASON, ErrorInfo

__all__ = ["MAX_ERROR_CHARS", "MAX_REASON", "bounded"]

MAX_ERROR_CHARS = 1 << 20  # of an error's message, and of its traceback


def bounded(error: ErrorInfo) -> ErrorInfo:
    """An error short enough to record: a huge message must not make the append fail."""
    # Characters per field; a large error is stored whole by reference (natflow_engine
    # _values), so the cut only guards against the absurd.
    limit = MAX_ERROR_CHARS
    if len(error.message) <= limit and len(error.traceback) <= limit:
        return error
    cut = "\n[... cut: too long to record ...]\n"
    message, trace = error.message, error.traceback
    return ErrorInfo(
        type=error.type,
        message=message if len(message) <= limit else message[: limit // 2] + cut,
        traceback=trace if len(trace) <= limit else trace[-limit // 2 :],
    )
