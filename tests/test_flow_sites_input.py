"""Bad input to flow control (issue 18) and sites (issue 17) gets a clear InvalidInput naming
the problem and the fix, at the earliest point: the decorator, the constructor, the command
line before it connects, or the hub before a command is stored for no one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import msgspec
import pytest
from natflow import Client, Debounce, InvalidInput, Limit, RateLimit, WorkflowContext, workflow
from natflow_engine._engine import Engine
from natflow_engine._sites import OUTBOX_STREAM

from tests.test_cli import assert_one_clear_error, natflow


class Region(msgspec.Struct):
    code: str


class Account(msgspec.Struct):
    customer: str
    region: Region


@dataclass
class Doc:
    doc: str


async def takes_account(ctx: WorkflowContext, input: Account) -> None: ...


async def takes_doc(ctx: WorkflowContext, input: Doc) -> None: ...


async def takes_dict(ctx: WorkflowContext, input: dict[str, Any]) -> None: ...


KEYED_OPTIONS = {
    "limit": lambda key: {"concurrency": Limit(max=2, key=key)},
    "rate_limit": lambda key: {"rate_limit": RateLimit("api", limit=5, key=key)},
    "debounce": lambda key: {"debounce": Debounce(1.0, key=key)},
    "singleton": lambda key: {"singleton": key},
}


@pytest.mark.parametrize("option", KEYED_OPTIONS)
def test_a_key_naming_no_field_of_the_declared_input_type_is_refused_at_the_decorator(
    option: str,
) -> None:
    """Before: accepted, and every start failed (or, started by name, ran unkeyed)."""
    declare = KEYED_OPTIONS[option]
    with pytest.raises(InvalidInput) as found:
        workflow(**declare("tenant"))(takes_account)
    text = str(found.value)
    assert "'tenant'" in text and "Account" in text and "it has: customer, region" in text
    assert "name one of them, or pass a function" in text
    with pytest.raises(InvalidInput, match=r"type Region has no field 'zone'.*it has: code"):
        workflow(**declare("region.zone"))(takes_account)
    with pytest.raises(InvalidInput, match="type Doc has no field 'id'"):
        workflow(**declare("id"))(takes_doc)
    # Fields it has, a function of the input, or an untyped input: accepted.
    workflow(**declare("region.code"))(takes_account)
    workflow(**declare("doc"))(takes_doc)
    workflow(**declare(lambda value: value.customer))(takes_account)
    workflow(**declare("anything"))(takes_dict)


def test_concurrency_given_a_number_says_to_wrap_it_in_a_limit() -> None:
    """Before: TypeError: 'int' object is not iterable."""
    with pytest.raises(InvalidInput, match=r"write concurrency=Limit\(max=3\)"):
        workflow(concurrency=3)(takes_dict)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="Limit"):
        workflow(concurrency="customer")(takes_dict)  # type: ignore[arg-type]


def test_a_limit_of_more_slots_than_one_read_covers_is_refused() -> None:
    """Before: Limit(max=5000) was accepted, and admission failed in the worker once more
    than 1024 slots (the server's batch read) were held."""
    Limit(max=1000)
    with pytest.raises(InvalidInput, match=r"from 1 to 1000.*split the limit by a key"):
        Limit(max=1001)
    with pytest.raises(InvalidInput, match="from 1 to 1000"):
        Limit(max=0)
    with pytest.raises(InvalidInput, match=r"hold_while_waiting.*True or False"):
        Limit(max=1, hold_while_waiting="yes")  # type: ignore[arg-type]


def test_rate_limit_and_parallelism_refuse_booleans_and_an_empty_key() -> None:
    """Before: True passed as 1 and key="" silently meant no key."""
    for bad in ({"limit": True}, {"limit": 1, "burst": True}, {"limit": 1, "period": True}):
        with pytest.raises(InvalidInput, match="rate limit 'api'"):
            RateLimit("api", **bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="leave it out for one budget"):
        RateLimit("api", limit=1, key="")
    with pytest.raises(InvalidInput, match="1-64 characters"):
        RateLimit("the api", limit=1)
    with pytest.raises(InvalidInput, match="max_parallel_steps"):
        workflow(max_parallel_steps=True)(takes_dict)


async def test_a_hub_refuses_commands_for_a_site_it_does_not_serve(client: Client) -> None:
    """Before: client.site("nope") stored starts and signals in the outbox, where no site
    would ever read them (kept 30 days, never applied, no word)."""
    engine = Engine(client.connection, sites=["berlin", "paris"])
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.ready.wait()
        nope = client.site("nope")
        for command in (
            lambda: nope.start("any_flow", {}),
            lambda: nope.signal("r-1", "go"),
            lambda: nope.cancel("r-1"),
        ):
            with pytest.raises(InvalidInput) as found:
                await command()
            assert "site 'nope' is not served by this hub" in str(found.value)
            assert "--sites berlin,paris" in str(found.value)
        info = await client.connection.jsm.stream_info(OUTBOX_STREAM)
        assert info.state.messages == 0  # nothing stored for no one
        with pytest.raises(InvalidInput, match="control kind 'stop' is not one of"):
            await client.site("berlin").control("r-1", "stop", None)
        await client.site("berlin").signal("r-1", "go")  # a served site: stored
        info = await client.connection.jsm.stream_info(OUTBOX_STREAM)
        assert info.state.messages == 1
        with pytest.raises(InvalidInput, match="invalid site 'a b'"):
            client.site("a b")
        tg.cancel_scope.cancel()


async def test_bad_site_names_are_refused_before_connecting(client: Client) -> None:
    with pytest.raises(InvalidInput, match=r"invalid site 'a\.b'"):
        Engine(client.connection, sites=["berlin", "a.b"])
    with pytest.raises(InvalidInput, match="invalid hub_domain 'h b'"):
        Engine(client.connection, site="berlin", hub_domain="h b")
    dead = "nats://127.0.0.1:1"  # nothing listens: the name is refused before connecting
    proc = await natflow(dead, "engine", "--sites", "berlin,a b")
    assert_one_clear_error(proc, "invalid site 'a b'")
    proc = await natflow(dead, "engine", "--site", "berlin", "--hub-domain", "h.b")
    assert_one_clear_error(proc, "invalid --hub-domain 'h.b'")
