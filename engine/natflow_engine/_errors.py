"""The natflow error hierarchy.

Every error natflow raises to a user derives from :class:`NatflowError`::

    NatflowError
    ├── InvalidInput            bad argument or payload; nothing was written
    ├── RunNotFound             no run has that id
    ├── ServerUnavailable       no NATS server answered (names the command that starts one)
    ├── ConnectionRefused       a server answered but refused the connection (TLS, credentials)
    ├── PermissionDenied        the server refused a subject to this connection
    ├── NonDeterminismError     replay asked for a different step than history recorded
    ├── RunFailed               the run ended with an error (type, message, traceback)
    ├── RunCancelled            the run was cancelled or terminated
    ├── StepError               a step raised; catchable inside the workflow
    ├── StepTimeout             one attempt of a step ran past its timeout (recorded)
    └── SignalTimeout           wait_for_signal's timeout passed first

Errors that carry a recorded failure expose it as ``error`` (an :class:`ErrorInfo`).

Private control flow (suspend, evict) derives from ``BaseException`` and lives in the SDK,
so a workflow's ``except Exception`` can never swallow it.
"""

from __future__ import annotations

import msgspec


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A recorded error: what was raised, its message and its traceback text."""

    type: str
    message: str
    traceback: str = ""
    # With a payload codec: the message and traceback, encrypted (natflow_engine._sealing);
    # ``message`` then says "encrypted (key <id>)".
    sealed: str = ""
    # A large error (over the 64 KiB a history event keeps inline): the reference to the whole
    # error in the natflow_values object store (natflow_engine._values); ``message`` and
    # ``traceback`` then hold its head and tail, which readers replace with the whole.
    stored: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


class NatflowError(Exception):
    """Root of every error natflow raises."""


class InvalidInput(NatflowError, ValueError):
    """An argument or payload was rejected before anything was written."""


class RunNotFound(NatflowError, LookupError):
    """No run exists with the given id."""

    def __init__(self, run_id: str, message: str = "") -> None:
        super().__init__(
            message or f"no run with id {run_id!r}; check the id with `natflow runs list`"
        )
        self.run_id = run_id


class ServerUnavailable(NatflowError, ConnectionError):
    """No NATS server answered."""


class ConnectionRefused(NatflowError, ConnectionError):
    """A NATS server answered but refused the connection: its TLS handshake failed, or it
    refused the credentials. Retrying does not help; the message names what to fix."""


class PermissionDenied(NatflowError, PermissionError):
    """The NATS server denied this connection a subject."""


class NonDeterminismError(NatflowError):
    """The workflow's code asked for a different step than the run's history recorded.

    ``expected`` and ``recorded`` describe the command, such as ``"step 'charge'"`` or
    ``"sleep 'follow-up'"``; None means nothing.
    """

    def __init__(
        self, run_id: str, position: int, expected: str | None, recorded: str | None
    ) -> None:
        super().__init__(
            f"run {run_id!r}: at position {position} the workflow code asks for "
            f"{expected or 'nothing more'} but history recorded {recorded or 'nothing'}; "
            f"the run is held as 'blocked' until code compatible with its history is deployed "
            f"(guard new steps with ctx.patched())"
        )
        self.run_id = run_id
        self.position = position
        self.expected = expected
        self.recorded = recorded


class _RecordedError(NatflowError):
    """An error that carries an :class:`ErrorInfo` recorded in history."""

    def __init__(self, message: str, error: ErrorInfo) -> None:
        super().__init__(message)
        self.error = error

    @property
    def type(self) -> str:
        return self.error.type

    @property
    def traceback(self) -> str:
        return self.error.traceback


class RunFailed(_RecordedError):
    """The run ended with an error."""

    def __init__(self, run_id: str, error: ErrorInfo) -> None:
        super().__init__(f"run {run_id!r} failed: {error}", error)
        self.run_id = run_id


class RunCancelled(NatflowError):
    """The run was cancelled or (``terminated``) terminated."""

    def __init__(self, run_id: str, reason: str | None = None, *, terminated: bool = False) -> None:
        suffix = f": {reason}" if reason else ""
        super().__init__(
            f"run {run_id!r} was {'terminated' if terminated else 'cancelled'}{suffix}"
        )
        self.run_id = run_id
        self.reason = reason
        self.terminated = terminated


class StepError(_RecordedError):
    """A step raised; the recorded error is raised in the workflow as this."""

    def __init__(self, step: str, error: ErrorInfo) -> None:
        super().__init__(f"step {step!r} failed: {error}", error)
        self.step = step


class StepTimeout(NatflowError, TimeoutError):
    """One attempt of a step ran longer than its ``timeout``; recorded as the attempt's error."""

    def __init__(self, step: str, attempt: int, seconds: float) -> None:
        super().__init__(f"step {step!r} attempt {attempt} timed out after {seconds:g} s")
        self.step = step
        self.attempt = attempt
        self.seconds = seconds


class SignalTimeout(NatflowError, TimeoutError):
    """``wait_for_signal`` timed out before a signal of that name arrived."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no signal {name!r} arrived before the timeout")
        self.signal = name
