"""User values (inputs, results) to and from JSON, with errors that name the problem."""

from __future__ import annotations

import traceback
from typing import Any

import msgspec

from ._errors import ErrorInfo, InvalidInput

_encoder = msgspec.json.Encoder()


def encode_value(what: str, value: Any) -> bytes:
    """JSON for ``value`` (JSON types, msgspec Structs, dataclasses, datetimes, ...)."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"{what} of type {type(value).__name__} cannot be encoded as JSON ({exc}); "
            f"use JSON values, msgspec Structs or dataclasses"
        ) from exc


def decode_value(what: str, data: bytes, type_: Any = Any) -> Any:
    """Decode JSON ``data`` into ``type_``; a mismatch names the offending field."""
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        name = getattr(type_, "__name__", str(type_))
        raise InvalidInput(f"{what} does not fit {name}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc


def error_info(exc: BaseException) -> ErrorInfo:
    """What history records of a raised error."""
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else cls.__name__
    return ErrorInfo(
        type=name,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
    )
