"""Which callables ``natflow worker MODULE:ATTR`` treats as a Worker factory.

Calling a callable runs its code: a step function named by mistake ran (its side effects with
it) with the client as its argument. API.md promises that a callable returning a Worker is
called, annotated or not, so a callable is refused only where its annotations say it is
something else: a return annotation that names no Worker, or (with no return annotation) a
first parameter annotated as anything but a Client.
"""

from __future__ import annotations

import inspect
import re
import typing

from ._client import Client
from ._worker import Worker


def is_worker_factory(value: object) -> bool:
    """Whether ``value`` is a callable whose annotations do not rule out making a Worker."""
    if not callable(value) or inspect.isbuiltin(value):  # print, len: no factory of ours
        return False
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin or extension callable: it says nothing
        return False
    returns = signature.return_annotation
    if returns is not inspect.Signature.empty:
        return _names(returns, Worker)
    first = next(iter(signature.parameters.values()), None)
    return (
        first is None
        or first.annotation is inspect.Parameter.empty
        or (_names(first.annotation, Client))
    )


def _names(annotation: object, cls: type) -> bool:
    """Whether an annotation names ``cls``: the class, a generic over it (``Awaitable[Worker]``,
    ``Worker | None``) or, under ``from __future__ import annotations``, its text."""
    if annotation is inspect.Signature.empty:
        return False
    if isinstance(annotation, str):  # not evaluated: its names may not resolve here
        return re.search(rf"(?<!\w){cls.__name__}\b", annotation) is not None
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return issubclass(annotation, cls)
    return any(_names(arg, cls) for arg in typing.get_args(annotation))
