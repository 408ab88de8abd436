"""Retry policies for steps."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta

from ._durations import to_seconds
from ._errors import InvalidInput


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing step is retried.

    Example::

        RetryPolicy(max_attempts=5, initial_interval=0.5, non_retryable=(ValueError,))

    Attempt ``n`` (n >= 2) starts ``initial_interval * backoff_coefficient ** (n - 2)``
    seconds after the previous one failed, capped at ``max_interval``, then spread by
    ``±jitter`` (a fraction). An error of (a subclass of) a class in ``non_retryable``, or
    of a class named there (``"PaymentDeclined"``, ``"Outer.Inner"`` as an error's type is
    recorded, or ``"flows.PaymentDeclined"``), is recorded at once.
    """

    max_attempts: int = 1
    initial_interval: float | timedelta = 1.0
    backoff_coefficient: float = 2.0
    max_interval: float | timedelta = 100.0
    jitter: float = 0.2
    non_retryable: tuple[type[BaseException] | str, ...] = field(default=())

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise InvalidInput(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        to_seconds("initial_interval", self.initial_interval)
        to_seconds("max_interval", self.max_interval)
        if not _number(self.backoff_coefficient) or not self.backoff_coefficient >= 1.0:
            raise InvalidInput(
                f"backoff_coefficient must be a number >= 1, not {self.backoff_coefficient!r}"
            )
        if not _number(self.jitter) or not 0.0 <= self.jitter <= 1.0:
            raise InvalidInput(f"jitter must be a number from 0 to 1, not {self.jitter!r}")
        # Found wrong only when a step fails and is looked up, long after: checked here.
        kinds = self.non_retryable
        if not isinstance(kinds, tuple) or not all(
            isinstance(k, str) or (isinstance(k, type) and issubclass(k, BaseException))
            for k in kinds
        ):
            raise InvalidInput(
                f"non_retryable must be a tuple of exception classes or their names, such as "
                f"(ValueError,) or ('ValueError',), not {kinds!r}"
            )

    def retryable(self, error: BaseException) -> bool:
        """False if ``error`` is (a subclass of) a class listed, or of a class named: by
        its name, its qualified name (``Outer.Inner``, as an error's type is recorded) or
        with its module (``flows.PaymentDeclined``). A class is matched as a class only:
        by its name, ``myapp.Error`` stopped the retries of every other ``Error`` too."""
        names = {t for t in self.non_retryable if isinstance(t, str)}
        classes = tuple(t for t in self.non_retryable if not isinstance(t, str))
        if classes and isinstance(error, classes):
            return False
        return not any(
            {cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"} & names
            for cls in type(error).__mro__
        )

    def delay(self, failed_attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after attempt ``failed_attempt`` failed."""
        base = to_seconds("initial_interval", self.initial_interval)
        cap = to_seconds("max_interval", self.max_interval)
        # The power alone overflows a float after enough attempts; the cap holds long before.
        exponent = min(failed_attempt - 1, 2000)
        try:
            delay = min(cap, base * self.backoff_coefficient**exponent)
        except OverflowError:
            delay = cap
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, delay * (1.0 + spread))


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


NO_RETRY = RetryPolicy()
