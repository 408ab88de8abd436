"""A task group's failure leaves as the one error its caller branches on
(``natflow_engine._error_groups``): the engine's and the worker's handlers catch natflow's
errors, which an ``ExceptionGroup`` hid."""

from __future__ import annotations

import anyio
import pytest
from natflow_engine import NatflowError, ServerUnavailable, one_error
from natflow_engine._connection import RequestTimeout


class _Suspended(BaseException):
    """As the SDK's control flow: a ``BaseException`` that must leave as itself."""


async def _fail(error: BaseException) -> None:
    raise error


async def _in_group(*errors: BaseException) -> None:
    with one_error():
        async with anyio.create_task_group() as tg:
            for error in errors:
                tg.start_soon(_fail, error)


def test_one_error_leaves_as_itself() -> None:
    async def main() -> None:
        with pytest.raises(ServerUnavailable, match="away") as caught:
            await _in_group(ServerUnavailable("away"))
        assert caught.value.__cause__ is None and not getattr(caught.value, "__notes__", [])
        with pytest.raises(_Suspended):
            await _in_group(_Suspended())

    anyio.run(main)


def test_the_body_s_own_error_leaves_as_itself() -> None:
    async def main() -> None:
        with pytest.raises(RequestTimeout), one_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.sleep, 10)
                raise RequestTimeout("no answer")

    anyio.run(main)


def test_of_several_the_gravest_leaves_and_names_the_others() -> None:
    async def main() -> None:
        # A bug before a lasting natflow error, that before a transient one.
        with pytest.raises(KeyError) as bug:
            await _in_group(ServerUnavailable("away"), NatflowError("refused"), KeyError("x"))
        notes = "".join(bug.value.__notes__)
        assert "2 more" in notes and "ServerUnavailable: away" in notes
        assert "NatflowError: refused" in notes
        with pytest.raises(NatflowError, match="refused") as lasting:
            await _in_group(ServerUnavailable("away"), NatflowError("refused"))
        assert not isinstance(lasting.value, ServerUnavailable)

    anyio.run(main)


def test_nested_groups_are_flattened() -> None:
    async def main() -> None:
        with pytest.raises(ServerUnavailable), one_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_in_group_raw, ServerUnavailable("away"))

    async def _in_group_raw(error: BaseException) -> None:
        async with anyio.create_task_group() as inner:
            inner.start_soon(_fail, error)

    anyio.run(main)


def test_several_with_a_base_exception_leave_as_the_group() -> None:
    async def main() -> None:
        with pytest.raises(BaseExceptionGroup):
            await _in_group(_Suspended(), ServerUnavailable("away"))

    anyio.run(main)


def test_a_recorded_error_keeps_its_chain_and_its_groups_members() -> None:
    """Only the last exception's own lines were kept: a `raise ... from` lost its cause, an
    ExceptionGroup all but "many (2 sub-exceptions)"."""
    from natflow_engine import error_info

    def wrapped() -> None:
        try:
            {}["k"]
        except KeyError as exc:
            raise RuntimeError("wrapper") from exc

    try:
        wrapped()
    except RuntimeError as exc:
        chained = error_info(exc).traceback
    assert "KeyError: 'k'" in chained and "direct cause" in chained, chained
    assert chained.rstrip().endswith("RuntimeError: wrapper")
    try:
        raise ExceptionGroup("many", [ValueError("first"), TypeError("second")])
    except ExceptionGroup as exc:
        grouped = error_info(exc).traceback
    assert "ValueError: first" in grouped and "TypeError: second" in grouped, grouped
