"""A task group's failure as the one error its caller handles.

anyio raises whatever fails inside a task group, the body's own error included, as an
``ExceptionGroup``. natflow's callers branch on natflow's errors: a worker hands a run back
on a transient one (:data:`TRANSIENT`) and counts anything else toward parking the run; the
engine's index guard retries a repair cut off by a lost server. A group hid them: a run
whose append timed out beside its lease's write was logged as a bug and, eight deliveries
later, parked, and the engine died of a repair cut off by a server restart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ._connection import TRANSIENT
from ._errors import NatflowError


@contextlib.contextmanager
def one_error() -> Iterator[None]:
    """Around a task group: a failure inside it leaves as one error. One raised alone leaves
    as itself (the SDK's control flow too: a suspension is a ``BaseException``); of several,
    the gravest (a bug before a natflow error, a lasting one before a transient one), the
    others named in a note on it. Several holding a ``BaseException`` leave as the group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        if len(errors) == 1:
            raise errors[0] from None
        if not all(isinstance(e, Exception) for e in errors):
            raise
        chosen = min(errors, key=_gravity)
        others = [e for e in errors if e is not chosen]
        if others:
            chosen.add_note(
                f"and {len(others)} more in the same task group: "
                + "; ".join(f"{type(e).__name__}: {e}" for e in others)
            )
        raise chosen from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found += _leaves(error)
        else:
            found.append(error)
    return found


def _gravity(error: BaseException) -> int:
    if not isinstance(error, NatflowError):
        return 0  # a bug: shown, never retried as if the server were away
    return 2 if isinstance(error, TRANSIENT) else 1
