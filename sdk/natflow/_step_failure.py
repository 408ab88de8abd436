"""What a step's recorded failure raises in the workflow."""

from __future__ import annotations

from natflow_engine import ErrorInfo, StepError, StepTimeout
from natflow_engine.events import StepFailed


class StepTimedOut(StepError, StepTimeout):
    """A step whose last attempt ran past its timeout, as the workflow meets it: a
    :class:`StepError` (``.error`` is what was recorded) that is also a :class:`StepTimeout`
    (so a ``TimeoutError``) with its ``attempt`` and ``seconds``. It was a plain StepError,
    and ``except StepTimeout`` never matched."""

    # Its name where it is shown (a run it fails records its type, a traceback prints it):
    # the class users know and catch, not this private one.
    __qualname__ = "StepTimeout"

    def __init__(self, step: str, error: ErrorInfo, attempt: int, seconds: float) -> None:
        # Both bases set attributes only: set here, past their __init__s, which do not
        # cooperate (each would hand the other its own arguments).
        Exception.__init__(self, f"step {step!r} failed: {error}")
        self.error = error
        self.step = step
        self.attempt = attempt
        self.seconds = seconds


def step_failure(name: str, event: StepFailed, timeout: float | None) -> StepError:
    """What a step's recorded failure raises in the workflow."""
    if event.error.type == StepTimeout.__qualname__:
        return StepTimedOut(name, event.error, event.attempt, timeout or 0.0)
    return StepError(name, event.error)
