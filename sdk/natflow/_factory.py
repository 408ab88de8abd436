"""Which callables ``natflow worker MODULE:ATTR`` treats as a Worker factory.

Calling a callable runs its code: a step function named by mistake would run (its side
effects with it) with the client as its argument. So only a callable that says it makes a
Worker is called: one annotated to return a Worker (or an awaitable of one), or one taking a
parameter annotated Client.
"""

from __future__ import annotations

import inspect
import re
import typing

from ._client import Client
from ._worker import Worker


def is_worker_factory(value: object) -> bool:
    """Whether ``value`` is a callable whose annotations say it makes a Worker."""
    if not callable(value):
        return False
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):  # a builtin or extension callable: it says nothing
        return False
    if _names(signature.return_annotation, Worker):
        return True
    return any(_names(p.annotation, Client) for p in signature.parameters.values())


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
