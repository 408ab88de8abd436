"""The configs in ops/ made runnable by a test: a free port, a temporary store, real paths."""

from __future__ import annotations

import re
from pathlib import Path

OPS = Path(__file__).resolve().parent.parent / "ops"


def render_ops(source: Path, folder: Path, replace: dict[str, str] | None = None) -> Path:
    """``source`` on a free port (``-1``), its store in ``folder``, its includes copied beside
    it, and each ``replace`` key (such as a certificate path) replaced by its value."""
    folder.mkdir(parents=True, exist_ok=True)
    text = source.read_text()
    text = text.replace("listen: 127.0.0.1:4222", "listen: 127.0.0.1:-1")
    text = text.replace('store_dir: "./natflow-data"', f'store_dir: "{folder / "js"}"')
    # nats-server resolves an include relative to the including file, even an absolute path
    text = re.sub(r'include "([^"]+)"', lambda m: _copy_include(source, m[1], folder), text)
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    target = folder / source.name
    target.write_text(text)
    return target


def _copy_include(source: Path, name: str, folder: Path) -> str:
    included = (source.parent / name).resolve()
    (folder / included.name).write_text(included.read_text())
    return f'include "{included.name}"'
