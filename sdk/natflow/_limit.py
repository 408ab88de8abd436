"""``Limit``: how many runs may execute at once, across every worker.

A limit is declared on a workflow (``@workflow(concurrency=Limit(max=3, key="customer"))``)
and bound there to the workflow's name: :func:`bind_limits` turns the declarations into
:class:`BoundLimit` objects, which name each run's group (limit id and key value).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from natflow_engine import MAX_SLOTS, InvalidInput, LimitGroup, check_field_path

KeyFn = Callable[[Any], Any]
_MAX_KEY = 256


@dataclass(frozen=True)
class Limit:
    """At most ``max`` runs execute at once, counted across every worker and process.

    Example::

        @workflow(concurrency=[Limit(max=50), Limit(max=3, key="customer")])
        async def sync_account(ctx: WorkflowContext, input: Account) -> None: ...

    Args:
        max: how many runs may hold a slot at once (1 to 1000).
        key: with a key, ``max`` holds per value of the key: the name of a field of the
            input (``"customer"``, dotted for nested fields: ``"account.region"``), or a
            function of the input that returns the key (named by ``name=``, or its
            ``__name__``).
        scope: ``"workflow"`` (default: the workflow's runs share the slots) or ``"queue"``
            (every workflow that declares a queue limit shares the slots of the run's queue).
        name: a limit shared by every workflow that declares one of this name (e.g. one
            downstream API), whatever their scope.
        hold_while_waiting: keep the slot while the run sleeps or waits for a signal
            (default False: a waiting run holds no slot and takes one again to go on).
    """

    max: int
    key: str | KeyFn | None = None
    scope: Literal["workflow", "queue"] = "workflow"
    name: str | None = None
    hold_while_waiting: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.max, bool)
            or not isinstance(self.max, int)
            or not 1 <= self.max <= MAX_SLOTS
        ):
            raise InvalidInput(
                f"Limit(max=...) must be a whole number from 1 to {MAX_SLOTS}, not {self.max!r}"
                + (
                    " (a run reads all of a limit's slots in one request; for more at once, "
                    "split the limit by a key)"
                    if isinstance(self.max, int) and self.max > MAX_SLOTS
                    else ""
                )
            )
        if not isinstance(self.hold_while_waiting, bool):
            raise InvalidInput(
                f"Limit(hold_while_waiting=...) is True or False, not {self.hold_while_waiting!r}"
            )
        if self.scope not in ("workflow", "queue"):
            raise InvalidInput(f"Limit(scope=...) is 'workflow' or 'queue', not {self.scope!r}")
        if self.key is not None and not callable(self.key) and not isinstance(self.key, str):
            raise InvalidInput(
                f"Limit(key=...) takes the name of an input field or a function of the "
                f"input, not {self.key!r}"
            )
        if isinstance(self.key, str):
            check_field_path("Limit(key=...)", self.key)
        if self.name is not None and (
            not isinstance(self.name, str) or not self.name or not self.name.isprintable()
        ):
            raise InvalidInput(
                f"Limit(name=...) must be non-empty printable text, not {self.name!r}"
            )


@dataclass(frozen=True)
class BoundLimit:
    """A :class:`Limit` as declared by one workflow."""

    limit: Limit
    workflow: str

    @property
    def key_name(self) -> str | None:
        key = self.limit.key
        if key is None:
            return None
        if isinstance(key, str):
            return key
        return self.limit.name or getattr(key, "__name__", "key")

    def limit_id(self, queue: str) -> str:
        """The id of the slots this limit counts in, for a run on ``queue``."""
        if self.limit.name is not None:
            base = f"name:{self.limit.name}"
        elif self.limit.scope == "queue":
            base = f"queue:{queue}"
        else:
            base = f"workflow:{self.workflow}"
        return base if self.key_name is None else f"{base}/{self.key_name}"

    def key_value(self, value: Any) -> str:
        """The key of a run with input ``value`` ("" for a limit without a key).

        Raises:
            InvalidInput: the input has no such field, or the key function failed.
        """
        key = self.limit.key
        if key is None:
            return ""
        try:
            found = key(value) if callable(key) else _field(value, key)
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(
                f"the key of limit {self.key_name!r} of workflow {self.workflow!r} could not "
                f"be computed from the input: {type(exc).__name__}: {exc}"
            ) from exc
        text = found if isinstance(found, str) else str(found)
        if len(text) <= _MAX_KEY:
            return text
        # Kept short (it is stored with each slot and waiter), but never cut to a prefix: two
        # URLs with one long head were one key and queued behind each other's runs.
        digest = hashlib.sha256(text.encode(errors="surrogatepass")).hexdigest()[:16]
        return f"{text[: _MAX_KEY - 17]}~{digest}"

    def group(self, queue: str, value: Any) -> tuple[LimitGroup, str]:
        """The run's group and its label (``customer=acme``, ``workflow=order``)."""
        key = self.key_value(value)
        limit_id = self.limit_id(queue)
        if self.key_name is not None:
            label = f"{self.key_name}={key}"
        elif self.limit.name is not None:
            label = self.limit.name
        elif self.limit.scope == "queue":
            label = f"queue={queue}"
        else:
            label = f"workflow={self.workflow}"
        return LimitGroup(limit_id, key), label


def _field(value: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise InvalidInput(f"the input has no field {path!r} (the key of a limit)")
            value = value[part]
        elif hasattr(value, part):
            value = getattr(value, part)
        else:
            raise InvalidInput(f"the input has no field {path!r} (the key of a limit)")
    return value


def bind_limits(
    concurrency: Limit | Sequence[Limit] | None, workflow: str
) -> tuple[BoundLimit, ...]:
    """The workflow's limits in the order a run takes their slots: keyed limits first (a
    run waiting for a shared slot then holds only its own key's), then by id. One global
    order means two runs never wait for each other's slots."""
    if concurrency is None:
        return ()
    if isinstance(concurrency, Limit):
        given = [concurrency]
    elif isinstance(concurrency, list | tuple):
        given = list(concurrency)
    else:
        raise InvalidInput(
            f"concurrency takes Limit(...) or a list of them, not {concurrency!r}: "
            f"write concurrency=Limit(max={concurrency!r})"
            if isinstance(concurrency, int) and not isinstance(concurrency, bool)
            else f"concurrency takes Limit(...) or a list of them, not {concurrency!r}"
        )
    bound: list[BoundLimit] = []
    for limit in given:
        if not isinstance(limit, Limit):
            raise InvalidInput(f"concurrency takes Limit(...) or a list of them, not {limit!r}")
        bound.append(BoundLimit(limit, workflow))
    ids = [b.limit_id("<queue>") for b in bound]
    for limit_id in ids:
        if ids.count(limit_id) > 1:
            raise InvalidInput(
                f"workflow {workflow!r} declares limit {limit_id!r} twice; give one of them "
                f"another key or name="
            )
    return tuple(sorted(bound, key=lambda b: (b.key_name is None, b.limit_id("<queue>"))))
