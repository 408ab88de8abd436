"""A step's result reads back as the type its function says it returns, as mypy says it does:
a ``datetime``, ``Decimal``, ``UUID``, enum, ``list[Item]`` or ``Item | None`` as much as a
Struct, through ``functools.partial`` and callable objects too (only a bare Struct or
dataclass was: the rest came back as strings and dicts)."""

from __future__ import annotations

import enum
import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from natflow import Client, WorkflowContext, workflow
from natflow_engine._engine import Engine

from tests.helpers import replay_recorded, running_worker

T = TypeVar("T")


class Color(enum.Enum):
    RED = "red"


@dataclass
class Item:
    sku: str
    qty: int


def price() -> Decimal:
    return Decimal("12.30")


def due() -> datetime:
    return datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


def color() -> Color:
    return Color.RED


def ident() -> uuid.UUID:
    return uuid.UUID(int=7)


async def items(n: int) -> list[Item]:
    return [Item("a", n)]


def maybe(found: bool) -> Item | None:
    return Item("b", 2) if found else None


def item_of(sku: str, qty: int) -> Item:
    return Item(sku, qty)


class Pricer:
    def __call__(self) -> Decimal:
        return Decimal("1.5")


def same(value: T) -> T:  # a TypeVar: no type to decode into, plain JSON
    return value


@workflow(name="typed_steps")
async def typed_steps(ctx: WorkflowContext) -> list[str]:
    got = [
        await ctx.step("price", price),
        await ctx.step("due", due),
        await ctx.step("color", color),
        await ctx.step("ident", ident),
        (await ctx.step("items", items, 3))[0],
        await ctx.step("maybe", maybe, True),
        await ctx.step("partial", functools.partial(item_of, "c"), 4),
        await ctx.step("callable", Pricer()),
        await ctx.step("same", same, {"k": 1}),
    ]
    return [type(value).__name__ for value in got]


async def test_step_results_read_back_as_their_annotated_types(
    client: Client, engine: Engine
) -> None:
    expected = ["Decimal", "datetime", "Color", "UUID", "Item", "Item", "Item", "Decimal", "dict"]
    async with running_worker(client, [typed_steps]):
        handle = await client.start(typed_steps, run_id="typed")
        assert await handle.result(timeout=20) == expected
    replayed = await replay_recorded(client, typed_steps, "typed")
    assert replayed.divergence is None and replayed.result == expected


def greet_by(name: str, fn: str) -> str:
    return f"{fn} {name}"


@workflow(name="keyword_names")
async def keyword_names(ctx: WorkflowContext) -> str:
    return await ctx.step("hello", greet_by, name="Ada", fn="hi")


async def test_a_step_function_may_take_keywords_named_name_and_fn(
    client: Client, engine: Engine
) -> None:
    """They were ctx.step's own: 'got multiple values for argument name'."""
    async with running_worker(client, [keyword_names]):
        handle = await client.start(keyword_names, run_id="kw")
        assert await handle.result(timeout=20) == "hi Ada"
