"""Decorator-time checks of flow-control keys against a workflow's declared input type.

``Limit(key="customer")``, ``RateLimit(key=...)``, ``Debounce(key=...)`` and
``singleton="customer"`` name an input field. When the input is declared as a msgspec
Struct, a dataclass or a TypedDict, a field it does not have is a mistake every start would
hit: it is refused when the module is imported, not at the first start (or, for a start by
name, in the worker). Inputs typed ``dict`` or ``Any`` are checked at each start.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from typing import Any

import msgspec
from natflow_engine import InvalidInput, RateLimit

from ._limit import BoundLimit


def _fields(cls: Any) -> dict[str, Any] | None:
    """The fields of a declared record type and their types (None: not a record type)."""
    if not isinstance(cls, type):
        return None
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation: leave the check to each start
        return None
    if issubclass(cls, msgspec.Struct):
        names = cls.__struct_fields__
    elif dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls))
    elif typing.is_typeddict(cls):
        names = tuple(hints)
    else:
        return None
    return {name: hints.get(name, Any) for name in names}


def _check_path(workflow: str, input_type: Any, what: str, path: str) -> None:
    current: Any = input_type
    for depth, part in enumerate(path.split(".")):
        fields = _fields(current)
        if fields is None:
            return  # dict, Any, a union: known only at each start
        if part not in fields:
            where = ".".join(path.split(".")[:depth]) or "input"
            raise InvalidInput(
                f"workflow {workflow!r}: {what} names field {path!r}, but its {where} "
                f"type {current.__name__} has no field {part!r} (it has: "
                f"{', '.join(fields) or 'none'}); name one of them, or pass a function of "
                f"the input"
            )
        current = fields[part]


def check_key_fields(
    workflow: str,
    input_type: Any,
    *,
    limits: Iterable[BoundLimit],
    rate_limit: RateLimit | None,
    debounce_key: object,
    singleton: object,
) -> None:
    """Refuse a key naming a field the workflow's declared input type lacks.

    Takes the definition's parts (name, input type, the declared keys), not the
    :class:`Workflow`, whose module calls this one when ``@workflow`` runs.
    """
    for bound in limits:
        if isinstance(bound.limit.key, str):
            _check_path(workflow, input_type, f"Limit(key={bound.limit.key!r})", bound.limit.key)
    if rate_limit is not None and isinstance(rate_limit.key, str):
        what = f"RateLimit({rate_limit.name!r}, key={rate_limit.key!r})"
        _check_path(workflow, input_type, what, rate_limit.key)
    if isinstance(debounce_key, str):
        _check_path(workflow, input_type, f"Debounce(key={debounce_key!r})", debounce_key)
    if isinstance(singleton, str) and singleton:
        _check_path(workflow, input_type, f"singleton={singleton!r}", singleton)
