"""What ``natflow worker MODULE:ATTR`` does with ATTR: a workflow, a list of them, or a factory
that says it makes a Worker; anything else is refused in one line, and nothing is called."""

from __future__ import annotations

import os
import subprocess
import types
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from natflow import Client, Worker
from natflow._factory import is_worker_factory
from natflow_engine._server import EmbeddedServer

from tests.helpers import ROOT
from tests.links import free_port
from tests.test_cli import NATFLOW, assert_one_clear_error, natflow

STEP_MODULE = """
from pathlib import Path
from natflow import WorkflowContext, workflow

def charge_card(customer: str) -> str:  # a step function: running it charges a card
    Path(__file__).with_name("charged").write_text(repr(customer))
    return "charged"

@workflow
async def checkout(ctx: WorkflowContext, input: dict) -> str:
    return await ctx.step("charge", charge_card, input["customer"])
"""


async def test_a_step_function_named_as_attr_is_refused_and_never_called(
    nats_server: EmbeddedServer, tmp_path: Path
) -> None:
    app = tmp_path / "app.py"
    app.write_text(STEP_MODULE)
    target = f"{app}:charge_card"
    proc = await natflow(
        nats_server.url, "worker", target, "--processes", "1", "--metrics-port", "0"
    )
    assert_one_clear_error(
        proc, "'charge_card'", "not a workflow, a list of workflows, nor a function returning a"
    )
    assert not (tmp_path / "charged").exists()  # its side effect did not happen


def make(client: Client) -> Worker:
    raise AssertionError


async def make_async(client: Any) -> Worker:
    raise AssertionError


def make_awaitable() -> Awaitable[Worker]:
    raise AssertionError


def make_odd(client: Client) -> int:  # says it returns something else
    raise AssertionError


def step(customer: str) -> str:
    return customer


def evaluated(fn: Callable[..., object]) -> Callable[..., object]:
    """A copy of ``fn`` whose annotations are objects, as without the __future__ import."""
    assert isinstance(fn, types.FunctionType)
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)
    copy.__annotations__ = typing.get_type_hints(fn)
    return copy


def unannotated(client):  # type: ignore[no-untyped-def]  # API.md: still a factory
    raise AssertionError


def test_only_a_callable_whose_annotations_say_it_makes_no_worker_is_refused() -> None:
    # This module's annotations are text (the __future__ import); evaluated ones count too.
    for factory in (make, make_async, make_awaitable, unannotated, lambda client: client):
        assert is_worker_factory(factory), factory
        assert is_worker_factory(evaluated(factory)), factory
    for other in (step, evaluated(step), make_odd, evaluated(make_odd), print, "make", None):
        assert not is_worker_factory(other), other


def free_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"  # none of these gets as far as connecting


async def natflow_in(folder: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "NATFLOW_URL": free_url(), "PYTHONPATH": str(ROOT)}
    with anyio.fail_after(30):
        return await anyio.run_process([*NATFLOW, *args], env=env, cwd=folder, check=False)


def assert_only_their_frames(stderr: str, target: str, *expected: str) -> None:
    """The header, then exactly the expected lines: their frames and the exception."""
    lines = stderr.splitlines()
    assert lines[0] == f"natflow worker: importing {target!r} failed:", stderr
    assert lines[1:] == list(expected), stderr


async def test_a_syntax_error_shows_its_line_and_caret_and_nothing_of_natflow(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app.py"
    app.write_text("from natflow import workflow\n\n@workflow\nasync def wf(ctx, input)\n")
    proc = await natflow(free_url(), "worker", str(app), "--processes", "1")
    assert proc.returncode == 1
    assert_only_their_frames(
        proc.stderr.decode(),
        str(app),
        f'  File "{app}", line 4',
        "    async def wf(ctx, input)",
        "                            ^",
        "SyntaxError: expected ':'",
    )


async def test_an_error_raised_while_importing_shows_the_users_frames_only(
    tmp_path: Path,
) -> None:
    (tmp_path / "helpers.py").write_text("import json\n\nRATE = 1 / 0\n")
    (tmp_path / "app.py").write_text("import helpers\nimport no_such_dependency\n")
    (tmp_path / "other.py").write_text("import no_such_dependency\n")
    for target, expected in (
        (
            "app",
            (
                f'  File "{tmp_path / "app.py"}", line 1, in <module>',
                "    import helpers",
                f'  File "{tmp_path / "helpers.py"}", line 3, in <module>',
                "    RATE = 1 / 0",
                "           ~~^~~",
                "ZeroDivisionError: division by zero",
            ),
        ),
        (
            "other",  # the module is there; what it imports is not
            (
                f'  File "{tmp_path / "other.py"}", line 1, in <module>',
                "    import no_such_dependency",
                "ModuleNotFoundError: No module named 'no_such_dependency'",
            ),
        ),
    ):
        proc = await natflow_in(tmp_path, "worker", target, "--processes", "1")
        assert proc.returncode == 1
        assert_only_their_frames(proc.stderr.decode(), target, *expected)
