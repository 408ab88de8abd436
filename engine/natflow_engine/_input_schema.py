"""A start's input checked against the JSON Schema workers announce for its workflow.

A worker announces, for each workflow it serves, the JSON Schema of the input its annotation
takes (``WorkerInfo.input_schemas``). A start that holds the workflow's definition checks its
input against the annotation itself; a start that only names the workflow (``client.start``
by name, ``natflow start``, the console's start form) checks it against the announced schema
here, so input that does not fit is refused before anything is written, whoever starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Final

import jsonschema
import msgspec

from ._connection import Connection
from ._errors import InvalidInput, PermissionDenied
from ._registry import WorkerInfo, list_workers

log = logging.getLogger("natflow.client")

SCHEMA_TTL: Final = 5.0  # seconds a read schema (or its absence) is trusted, per connection
_CACHE: Final = "natflow_input_schemas"


# Where live workers announce different schemas for one workflow (a rolling deploy that
# changes its input type), the input may fit any of them: the first worker's alone refused
# what the others take, and passed what they fail on.
ALTERNATIVES: Final = "x-natflow-alternatives"


def announced(workers: Iterable[WorkerInfo], workflow: str) -> Any | None:
    """The input schema the workers announce for ``workflow`` (None: none announces one);
    where they differ, ``{"anyOf": [...], ALTERNATIVES: [identities per schema]}``, each
    schema checked on its own by :func:`check_input`."""
    found: list[Any] = []
    by: list[list[str]] = []
    for worker in workers:
        schema = worker.input_schemas.get(workflow)
        if schema is None:
            continue
        if schema in found:
            by[found.index(schema)].append(worker.identity)
        else:
            found.append(schema)
            by.append([worker.identity])
    if len(found) <= 1:
        return found[0] if found else None
    log.warning(
        "workers announce %d input types for workflow %r (%s): a start's input is accepted if "
        "it fits one of them, and a worker that takes a run whose input does not fit its own "
        "type fails the run (InvalidInput): finish the rolling deploy, or start with input "
        "both versions take",
        len(found),
        workflow,
        "; ".join(", ".join(names) for names in by),
    )
    return {"anyOf": found, ALTERNATIVES: by}


async def announced_schema(conn: Connection, workflow: str) -> Any | None:
    """:func:`announced` among the registered workers, read at most once per
    :data:`SCHEMA_TTL` per workflow on this connection (a start by name is on a hot path);
    None where this connection may not read the workers."""
    cache = conn.extras.setdefault(_CACHE, {})
    assert isinstance(cache, dict)
    now = time.monotonic()
    found = cache.get(workflow)
    if found is not None and found[1] > now:
        return found[0]
    try:
        schema = announced(await list_workers(conn), workflow)
    except PermissionDenied:  # a role that may start but not read workers (frontend)
        schema = None  # unchecked here, as before: its worker refuses what does not fit
    cache[workflow] = (schema, now + SCHEMA_TTL)
    return schema


def check_input(
    workflow: str, data: bytes, schema: Any, *, what: str = "input", give: str = "give one"
) -> None:
    """:class:`InvalidInput` naming where JSON ``data`` does not fit ``schema`` (None: no
    schema, nothing to check); ``what`` names the input, ``give`` says how to pass one."""
    if schema is None:
        return
    if isinstance(schema, dict) and ALTERNATIVES in schema:
        refusals = []
        for alternative in schema["anyOf"]:
            try:
                check_input(workflow, data, alternative, what=what, give=give)
            except InvalidInput as refused:
                refusals.append(str(refused))
            else:
                return
        raise InvalidInput(
            f"{refusals[0]} (its workers announce {len(refusals)} input types; it fits none: "
            f"{'; '.join(refusals[1:])})"
        )
    value = msgspec.json.decode(data)
    try:
        # With formats checked (a "uuid" field given "not-a-uuid" passed, and the run failed
        # on its input once a worker decoded it).
        checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
        validator = jsonschema.Draft202012Validator(schema, format_checker=checker)
        errors = list(validator.iter_errors(value))
    except jsonschema.SchemaError as exc:  # a worker's announcement, not the caller's input
        raise InvalidInput(
            f"the schema announced for {workflow!r} is broken: {exc.message}"
        ) from None
    if not errors:
        return
    if data == b"null":
        raise InvalidInput(f"workflow {workflow!r} takes an input: {give}")
    error = jsonschema.exceptions.best_match(errors)
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    raise InvalidInput(
        f"{what} does not fit workflow {workflow!r}: "
        f"{'at $' + where + ': ' if where else ''}{error.message}"
    )
