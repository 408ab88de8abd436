"""User values (inputs, results) to and from JSON, with errors that name the problem."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import math
import os
import traceback
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ._errors import ErrorInfo, InvalidInput
from ._undecodable import UNDECODABLE

_encoder = msgspec.json.Encoder()


def encode_value(what: str, value: Any) -> bytes:
    """JSON for ``value`` (JSON types, msgspec Structs, dataclasses, datetimes, ...)."""
    try:
        data = _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"{what} of type {type(value).__name__} cannot be encoded as JSON ({exc}); "
            f"use JSON values, msgspec Structs or dataclasses"
        ) from exc
    # msgspec writes NaN and infinities as null: a mean of nothing came back as None. Only
    # a value whose JSON holds a null can hold one, so others are not walked.
    if b"null" in data:
        where = _non_finite(msgspec.to_builtins(value), "")
        if where is not None:
            raise InvalidInput(
                f"{what} holds {where[1]} at {where[0] or 'its top'}, which JSON cannot "
                "carry (it would come back as None); use None or a string instead"
            )
    return data


def _non_finite(value: Any, path: str) -> tuple[str, str] | None:
    """Where in ``value`` (builtins only) the first NaN or infinity is, and which."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, repr(value))
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _non_finite(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def decode_value(what: str, data: bytes, type_: Any = Any) -> Any:
    """Decode JSON ``data`` into ``type_``; a mismatch names the offending field."""
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        name = getattr(type_, "__name__", str(type_))
        raise InvalidInput(f"{what} does not fit {name}: {exc}") from exc
    except UNDECODABLE as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from exc


def parse_json_text(what: str, text: str, hint: str = "") -> bytes:
    """JSON someone typed (a CLI argument, a console form) as compact JSON; otherwise
    :class:`InvalidInput` naming ``what`` and the problem, ``hint`` after a syntax error.

    Python's parser takes more than JSON: NaN and Infinity (stored as null, so "checked as
    JSON" and yet changed), and escaped lone surrogates (``"\\ud800"``), which UTF-8 cannot
    hold (the encoder raised, the console answered 500).
    """
    try:
        return _encoder.encode(json.loads(text, parse_constant=_not_json))
    except json.JSONDecodeError as exc:
        where = f"{exc.msg} at line {exc.lineno}, column {exc.colno}"
        raise InvalidInput(f"{what} is not valid JSON: {where}. {hint}".rstrip()) from None
    except RecursionError:  # Python's parser recurses once per level
        raise InvalidInput(
            f"{what} nests arrays or objects too deeply (about a thousand levels inside each "
            "other); flatten it"
        ) from None
    except UnicodeEncodeError as exc:
        half = ascii(exc.object[exc.start : exc.end])[1:-1]
        raise InvalidInput(
            f"{what} holds text that is not UTF-8: {half} is half of a surrogate pair, "
            "without its other half"
        ) from None
    except InvalidInput as exc:
        raise InvalidInput(f"{what}: {exc}") from None


def _not_json(constant: str) -> None:
    raise InvalidInput(f"{constant} is not a JSON value (JSON has no NaN or infinities)")


def error_info(exc: BaseException) -> ErrorInfo:
    """What history records of a raised error: its type, message and the user's frames.

    Frames inside natflow, anyio and asyncio are left out: they say nothing about the
    user's code. A ``StepError`` that fails a run carries the step's own traceback too.
    """
    cls = type(exc)
    # As Python prints it, chained causes and an exception group's members included (only
    # the last exception's own lines were kept: "many (2 sub-exceptions)" and not which).
    shown = traceback.TracebackException.from_exception(exc)
    _user_frames_only(shown, set())
    text = "".join(shown.format())
    cause = getattr(exc, "error", None)
    if isinstance(cause, ErrorInfo) and cause.traceback:
        text += f"\nThe step's error:\n{cause.traceback}"
    try:
        message = str(exc)
    except Exception as failed:  # the user's own __str__ raised: the run still fails with it
        message = f"(its message cannot be shown: str() raised {type(failed).__qualname__})"
    return ErrorInfo(type=cls.__qualname__, message=_text(message), traceback=_text(text))


def _user_frames_only(shown: traceback.TracebackException, seen: set[int]) -> None:
    """Leave out natflow's, anyio's and asyncio's frames, down every chained exception."""
    if id(shown) in seen:
        return
    seen.add(id(shown))
    shown.stack = traceback.StackSummary.from_list(
        [f for f in shown.stack if not _internal(f.filename)]
    )
    for inner in (shown.__cause__, shown.__context__, *(shown.exceptions or ())):
        if inner is not None:
            _user_frames_only(inner, seen)


def _text(text: str) -> str:
    """``text`` as it can be stored: a lone surrogate (``surrogateescape``'s stand-in for a
    byte that was not UTF-8, as in a file name) written as its escape, not refused."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _sdk_folder() -> Path:
    # The SDK's frames are natflow's own, not the user's; find its folder without importing it
    # (the engine never imports the SDK).
    spec = importlib.util.find_spec("natflow")
    origin = spec.origin if spec is not None and spec.origin else __file__
    return Path(origin).parent


_INTERNAL = tuple(
    str(Path(p).resolve()) + os.sep
    for p in (
        Path(__file__).parent,
        _sdk_folder(),
        Path(anyio.__file__).parent,
        Path(asyncio.__file__).parent,
        Path(concurrent.futures.__file__).parent.parent,
    )
)


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL) or filename.endswith("threading.py")
