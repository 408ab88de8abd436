"""Fixtures' building blocks for the console tests: the console served in-process on a free
port, and a real Chromium (Debian's, through Playwright; never a downloaded browser)."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from natflow_engine._connect import connect
from natflow_engine._connection import Connection
from natflow_engine.console import create_app, serve

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@asynccontextmanager
async def served_console(
    url: str, *, token: str | None = None, codec: Any = None, **nats_options: Any
) -> AsyncIterator[str]:
    """The console app for the server at ``url``, on a free port; yields its base URL.

    ``codec`` is what ``NATFLOW_CODEC_KEYS`` gives ``natflow ui``; ``nats_options`` are the
    connection's credentials (``user``, ``password``, ...)."""
    bound: list[int] = []
    ready = anyio.Event()

    def on_ready(port: int) -> None:
        bound.append(port)
        ready.set()

    async def opener() -> Connection:
        conn = await connect(url, name="natflow-console", **nats_options)
        conn.codec = codec
        return conn

    app = create_app(opener, token=token, server=url)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: serve(app, "127.0.0.1", 0, ready=on_ready))
        with anyio.fail_after(15):
            await ready.wait()
        yield f"http://127.0.0.1:{bound[0]}"
        tg.cancel_scope.cancel()


@asynccontextmanager
async def chromium(profile: Path, *, width: int = 1280, height: int = 860) -> AsyncIterator[Any]:
    """A browser context on a fresh Chromium profile (starting one takes seconds: share it)."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs Debian's chromium")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height},
            timezone_id="Europe/Berlin",  # times show in UTC unless the page is asked
            locale="en-GB",
        )
        try:
            context.set_default_timeout(15_000)
            yield context
        finally:
            await context.close()


def _request(
    url: str, data: bytes | None, headers: dict[str, str]
) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, data=data, headers=headers)
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


async def http(
    url: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    """GET (or POST ``form``) without following redirects: status, body, headers."""
    from urllib.parse import urlencode, urlsplit

    sent = dict(headers or {})
    data = None
    if form is not None:
        data = urlencode(form).encode()
        sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        parts = urlsplit(url)
        sent.setdefault("Origin", f"{parts.scheme}://{parts.netloc}")
    return await anyio.to_thread.run_sync(_request, url, data, sent)
