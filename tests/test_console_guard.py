"""The console's guard against visitors it should not trust: no NATS password on any page,
and no server name for a visitor without the token; no empty access token; no redirect off
the console; no framing; a form's JSON that cannot be stored (nested too deeply, NaN, a lone
surrogate) refused with a 400 naming it, not a 500 or a null; a workflow name taken as typed.

Over HTTP against a real nats-server, with the console in this process.
"""

from __future__ import annotations

import pytest
from natflow import Client
from natflow_engine._cli import build_parser
from natflow_engine._connection import Connection
from natflow_engine._errors import InvalidInput, RunNotFound
from natflow_engine._runs import Runs
from natflow_engine._server import EmbeddedServer
from natflow_engine.console import create_app
from nats.js.errors import NotFoundError

from tests.console_helpers import http, served_console

TOKEN = "guard-token-123"


def _with_password(url: str) -> str:
    """``url`` with a user and password (a server without auth accepts any)."""
    return url.replace("nats://", "nats://admin:S3cretPassw0rd@", 1)


async def test_pages_show_the_nats_url_without_its_password(nats_server: EmbeddedServer) -> None:
    """The header showed the NATS URL as given, password included, on every page; the 401
    page showed it to anyone. Now pages show ``admin:***@``, and a refusal no server."""
    url = _with_password(nats_server.url)
    async with served_console(url, token=TOKEN) as base:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/runs", "/workers", "/nowhere"):
            _, body, _ = await http(base + path, headers=bearer)
            assert "S3cretPassw0rd" not in body, path
            assert "nats://admin:***@127.0.0.1" in body, path
        got, body, _ = await http(base + "/runs")
        assert got == 401 and "S3cretPassw0rd" not in body
        assert "127.0.0.1:" + str(nats_server.port) not in body, "no server for a stranger"
    async with served_console(url) as base:  # no token: a rebinding site is refused
        got, body, _ = await http(base + "/runs", headers={"Host": "evil.example"})
        assert got == 400 and "S3cretPassw0rd" not in body
        assert "127.0.0.1:" + str(nats_server.port) not in body


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ("", ["ui"]),
        (None, ["ui", "--access-token", ""]),
        (None, ["ui", "--access-token", "  "]),
        ("", ["dev", "--ui-port", "0"]),
    ],
)
def test_an_empty_access_token_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str | None,
    args: list[str],
) -> None:
    """``NATFLOW_UI_TOKEN=`` (or ``--access-token ""``) was a token equal to ``?token=``:
    a console open to anyone, with no warning and no DNS-rebinding check. Now natflow
    refuses to start, in one line naming the option and the variable."""
    if env is None:
        monkeypatch.delenv("NATFLOW_UI_TOKEN", raising=False)
    else:
        monkeypatch.setenv("NATFLOW_UI_TOKEN", env)
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(args)  # what `natflow` parses before it starts anything
    said = capsys.readouterr().err
    assert exited.value.code == 2 and said.count("\n") == 1, said
    assert "token" in said and "access token is empty" in said and "NATFLOW_UI_TOKEN" in said


def test_create_app_refuses_an_empty_token() -> None:
    async def opener() -> Connection:
        raise AssertionError("never opened")

    for empty in ("", " \t"):
        with pytest.raises(InvalidInput, match="access token is empty"):
            create_app(opener, token=empty)


async def test_the_token_redirect_stays_on_the_console(nats_server: EmbeddedServer) -> None:
    """``GET //evil.example/x?token=<valid>`` redirected to ``//evil.example/x``, another
    site; now to this console's ``/evil.example/x``, the query kept without the token."""
    async with served_console(nats_server.url, token=TOKEN) as base:
        for path, there in (
            ("//evil.example/x", "/evil.example/x"),
            ("///evil.example/x", "/evil.example/x"),
            ("/%5Cevil.example/x", "/%5Cevil.example/x"),  # escaped: a path, not "/\\"
        ):
            got, _, headers = await http(f"{base}{path}?token={TOKEN}&status=failed")
            assert got == 303, path
            assert headers["location"] == f"{there}?status=failed", (path, headers)
        got, _, headers = await http(f"{base}/runs?status=failed&token={TOKEN}")
        assert got == 303 and headers["location"] == "/runs?status=failed"


async def test_no_framing_no_sniffing_and_a_secure_cookie_over_https(
    nats_server: EmbeddedServer,
) -> None:
    """No response said a browser may not frame the console (a click elsewhere could press
    its cancel button) or sniff a type; the cookie lacked Secure behind an https proxy. Now
    every response says DENY, frame-ancestors 'none' and nosniff, and the cookie is Secure
    when the request came over https."""
    async with served_console(nats_server.url, token=TOKEN) as base:
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path, headers in (
            ("/runs", bearer),
            ("/runs", {}),  # the 401 page
            ("/static/console.js", {}),
            ("/nowhere", bearer),
        ):
            _, _, got = await http(base + path, headers=headers)
            assert got["x-frame-options"] == "DENY", (path, got)
            assert got["content-security-policy"] == "frame-ancestors 'none'", (path, got)
            assert got["x-content-type-options"] == "nosniff", (path, got)
        _, _, got = await http(f"{base}/runs?token={TOKEN}")
        assert "secure" not in got["set-cookie"].lower(), "plain http: a Secure cookie is lost"
        proxied = {"X-Forwarded-Proto": "https"}  # from 127.0.0.1, a proxy uvicorn trusts
        _, _, got = await http(f"{base}/runs?token={TOKEN}", headers=proxied)
        assert "; secure" in got["set-cookie"].lower(), got


async def test_deeply_nested_json_in_a_form_is_a_400_naming_it(
    nats_server: EmbeddedServer, client: Client
) -> None:
    """A signal payload or start input of 100,000 nested arrays (200 KB, under the 1 MiB
    limit) made Python's JSON parser raise RecursionError: a 500 "Something went wrong".
    Now it is a 400 that says the value nests too deeply, and nothing is written."""
    deep = "[" * 100_000 + "]" * 100_000
    await Runs(client.connection).start("greet", "console", b"{}", "deep")
    async with served_console(nats_server.url) as base:
        for path, form, field in (
            ("/start", {"workflow": "greet", "run_id": "deeper", "input": deep}, "the input"),
            ("/runs/deep/signal", {"name": "go", "payload": deep}, "the payload"),
        ):
            got, body, _ = await http(base + path, form)
            assert got == 400, (path, got)
            assert f"{field} nests arrays or objects too deeply" in body, path
            assert "Something went wrong" not in body
    with pytest.raises(RunNotFound):
        await client.describe("deeper")


async def test_json_a_form_cannot_store_is_a_400_naming_it(
    nats_server: EmbeddedServer, client: Client
) -> None:
    """An escaped lone surrogate made the encoder raise: a 500. NaN and Infinity, which JSON
    has not, were taken and stored as null. Now each is a 400 that names it, as the CLI says,
    and nothing is written."""
    await Runs(client.connection).start("greet", "console", b"{}", "unstorable")
    cases = (
        ('"\\ud800"', "holds text that is not UTF-8: \\ud800 is half of a surrogate pair"),
        ('{"x": "a\\udc00"}', "holds text that is not UTF-8: \\udc00 is half"),
        ("NaN", "NaN is not a JSON value"),
        ('{"x": -Infinity}', "-Infinity is not a JSON value"),
    )
    async with served_console(nats_server.url) as base:
        for typed, problem in cases:
            for path, form, field in (
                ("/start", {"workflow": "greet", "run_id": "never", "input": typed}, "the input"),
                ("/runs/unstorable/signal", {"name": "go", "payload": typed}, "the payload"),
            ):
                got, body, _ = await http(base + path, form)
                assert got == 400, (path, typed, got)
                assert field in body and problem in body, (path, typed)
    with pytest.raises(RunNotFound):
        await client.describe("never")
    with pytest.raises(NotFoundError):
        await client.connection.js.get_last_msg("NATFLOW_SIGNALS", "natflow.signal.unstorable.>")


async def test_the_start_form_starts_the_workflow_name_as_typed(
    nats_server: EmbeddedServer, client: Client
) -> None:
    """``@workflow(name="trail ")`` is a valid name; the form stripped it and started 'trail',
    which no worker serves, so the run waited for ever."""
    async with served_console(nats_server.url) as base:
        form = {"workflow": "trail ", "run_id": "trailing", "input": "{}"}
        got, _, _ = await http(base + "/start", form)
        assert got == 303
    assert (await client.describe("trailing")).workflow == "trail "
