"""Validation of the names that natflow puts into NATS subjects."""

from __future__ import annotations

import hashlib
import re

from ._errors import InvalidInput

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_MAX_RUN_ID = 128
_MAX_WORKFLOW_NAME = 256


def check_token(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid subject token, else raise :class:`InvalidInput`.

    Run ids, queue names and signal names appear as one token of a NATS subject, so they are
    limited to ``[A-Za-z0-9_-]{1,128}``: a dot, space or wildcard would change the subject.
    """
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise InvalidInput(
            f"invalid {kind} {value!r}: use 1 to 128 characters from A-Z, a-z, 0-9, '_' and '-' "
            f"(no dots, spaces or wildcards)"
        )
    return value


def check_run_id(run_id: object) -> str:
    return check_token("run_id", run_id)


def check_queue(queue: object) -> str:
    return check_token("queue name", queue)


def check_workflow_name(name: object) -> str:
    """Workflow names travel in payloads only, but must be non-empty printable text."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_WORKFLOW_NAME
        or not name.isprintable()
    ):
        raise InvalidInput(
            f"invalid workflow name {name!r}: use 1 to {_MAX_WORKFLOW_NAME} printable characters"
        )
    return name


def check_step_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > _MAX_WORKFLOW_NAME
        or not (name.isascii() or _utf8(name))
    ):
        raise InvalidInput(
            f"invalid step name {name!r}: use a non-empty string of at most "
            f"{_MAX_WORKFLOW_NAME} characters, all of them text (no lone surrogates)"
        )
    return name


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a lone surrogate, as ``surrogateescape``
    leaves for undecodable bytes, cannot: no event holding it could be stored)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_field_path(what: str, path: object) -> str:
    """The name of an input field a key is read from, dotted for nested fields
    (``"account.region"``): no empty or blank part (``"a..b"`` named no field, and every
    start then failed)."""
    if (
        not isinstance(path, str)
        or not path.isprintable()
        or any(not part.strip() for part in path.split("."))
    ):
        raise InvalidInput(
            f"{what} {path!r} is not an input field's name (dotted for a nested field, such "
            f"as 'account.region')"
        )
    return path


def derived_run_id(run_id: str, suffix: str) -> str:
    """The id of a run derived from ``run_id`` (a restart, a child, an ``on_complete``
    run): ``<run_id><suffix>``, or, where that is no run id (over 128 characters), the
    start of ``run_id``, a digest of all of it, and the suffix. The same on every call, so
    a second engine, or a replay, derives the same run."""
    derived = f"{run_id}{suffix}"
    if len(derived) <= _MAX_RUN_ID and _TOKEN.fullmatch(derived):
        return derived
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    return f"{run_id[: _MAX_RUN_ID - len(suffix) - 17]}-{digest}{suffix}"
