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
from typing import TYPE_CHECKING, Any

import msgspec
from natflow_engine import InvalidInput

if TYPE_CHECKING:
    from ._workflow import Workflow


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


def _check_path(workflow: Workflow, what: str, path: str) -> None:
    current: Any = workflow.input_type
    for depth, part in enumerate(path.split(".")):
        fields = _fields(current)
        if fields is None:
            return  # dict, Any, a union: known only at each start
        if part not in fields:
            where = ".".join(path.split(".")[:depth]) or "input"
            raise InvalidInput(
                f"workflow {workflow.name!r}: {what} names field {path!r}, but its {where} "
                f"type {current.__name__} has no field {part!r} (it has: "
                f"{', '.join(fields) or 'none'}); name one of them, or pass a function of "
                f"the input"
            )
        current = fields[part]


def check_key_fields(workflow: Workflow) -> None:
    """Refuse a key naming a field the workflow's declared input type lacks."""
    for bound in workflow.limits:
        if isinstance(bound.limit.key, str):
            _check_path(workflow, f"Limit(key={bound.limit.key!r})", bound.limit.key)
    rate = workflow.rate_limit
    if rate is not None and isinstance(rate.key, str):
        _check_path(workflow, f"RateLimit({rate.name!r}, key={rate.key!r})", rate.key)
    if workflow.debounce is not None and isinstance(workflow.debounce.key, str):
        key = workflow.debounce.key
        _check_path(workflow, f"Debounce(key={key!r})", key)
    if isinstance(workflow.singleton, str) and workflow.singleton:
        _check_path(workflow, f"singleton={workflow.singleton!r}", workflow.singleton)
