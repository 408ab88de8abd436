"""The event loop of the processes `natflow` starts: uvloop where installed, unless
NATFLOW_EVENT_LOOP says asyncio; a value it cannot honour is a clear error, not a fallback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import warnings

import pytest
from natflow_engine import (
    LOOP_ENV,
    InvalidInput,
    event_loop_name,
    run_event_loop,
    running_loop_name,
)
from natflow_engine._event_loop import loop_factory

from tests.test_bench import natflow_command


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


async def _named() -> str:
    return running_loop_name()  # what the worker's and engine's startup lines say


def test_uvloop_is_the_default_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert run_event_loop(_loop_module()).startswith("uvloop")
    assert event_loop_name().startswith("uvloop ")
    assert run_event_loop(_named()) == "uvloop"


@pytest.mark.parametrize("value", ["asyncio", " Asyncio "])
def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(LOOP_ENV, value)
    assert loop_factory() is None
    assert run_event_loop(_loop_module()).startswith("asyncio")
    assert event_loop_name() == "asyncio"
    assert run_event_loop(_named()) == "asyncio"


def test_a_loop_it_does_not_know_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(LOOP_ENV, "trio")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutine is closed, not left never awaited
        with pytest.raises(
            InvalidInput, match=r"NATFLOW_EVENT_LOOP is 'trio'.*'uvloop' or 'asyncio'"
        ):
            run_event_loop(_loop_module())


def test_uvloop_asked_for_where_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    monkeypatch.delenv(LOOP_ENV, raising=False)
    assert loop_factory() is None  # not asked for: asyncio's own, quietly
    monkeypatch.setenv(LOOP_ENV, "uvloop")
    with pytest.raises(InvalidInput, match="uvloop is not installed: `pip install uvloop`"):
        loop_factory()


def test_the_command_line_names_a_bad_setting_and_exits_1() -> None:
    env = {**os.environ, LOOP_ENV: "fast"}
    done = subprocess.run(
        [*natflow_command(), "runs", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "natflow runs: NATFLOW_EVENT_LOOP is 'fast'" in done.stderr
    assert "Traceback" not in done.stderr
