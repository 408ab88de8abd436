"""The events of a run's history, as :meth:`Client.history` and :meth:`Client.watch` yield them.

Each is a frozen ``msgspec.Struct`` tagged on the wire by its ``type`` field (``run_started``,
``step_completed``, ...); :data:`Event` is their union. ``RunFailed`` and ``RunCancelled`` here
are the *events* of those names; the exceptions :class:`natflow.RunFailed` and
:class:`natflow.RunCancelled` are what :meth:`RunHandle.result` raises.

Values (``input``, ``result``, ``payload``) are kept as the JSON they were recorded as
(``msgspec.Raw``): decode them into what you expect.

Example::

    import msgspec
    from natflow import events

    for event in await client.history("order-123"):
        if isinstance(event, events.StepCompleted):
            print(event.name, msgspec.json.decode(event.result))
"""

from natflow_engine.events import (
    SCHEMA_VERSION,
    CancelRequested,
    ChildCompleted,
    ChildFailed,
    ChildStarted,
    Event,
    PatchMarked,
    RestartSeeded,
    RunBlocked,
    RunCancelled,
    RunClaimed,
    RunCompleted,
    RunContinued,
    RunFailed,
    RunPaused,
    RunReleased,
    RunRestarted,
    RunResumed,
    RunStarted,
    RunSuspended,
    RunTerminated,
    SignalReceived,
    SignalRejected,
    SignalWaited,
    StepCompleted,
    StepFailed,
    StepRetrying,
    StepStarted,
    TimerFired,
    TimerScheduled,
    Trigger,
)

__all__ = [
    "SCHEMA_VERSION",
    "CancelRequested",
    "ChildCompleted",
    "ChildFailed",
    "ChildStarted",
    "Event",
    "PatchMarked",
    "RestartSeeded",
    "RunBlocked",
    "RunCancelled",
    "RunClaimed",
    "RunCompleted",
    "RunContinued",
    "RunFailed",
    "RunPaused",
    "RunReleased",
    "RunRestarted",
    "RunResumed",
    "RunStarted",
    "RunSuspended",
    "RunTerminated",
    "SignalReceived",
    "SignalRejected",
    "SignalWaited",
    "StepCompleted",
    "StepFailed",
    "StepRetrying",
    "StepStarted",
    "TimerFired",
    "TimerScheduled",
    "Trigger",
]
