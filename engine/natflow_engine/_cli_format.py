"""Output of the ``natflow`` commands: aligned tables, JSON, input from files or stdin.

Plain formatting on purpose: the tables are a handful of short columns, and a table or colour
library would be one more dependency of every worker image for what 20 lines do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._errors import InvalidInput


def print_json(value: Any) -> None:
    """``value`` as indented JSON (msgspec structs, datetimes and all)."""
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 0) -> None:
    """Print aligned columns; the last column is not padded. ``right`` is a bit mask of the
    columns aligned right (numbers)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (header, *rows):
        cells = [
            cell.rjust(w) if right >> i & 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        cells[-1] = cells[-1].rstrip() if not right >> (len(cells) - 1) & 1 else cells[-1]
        print("  ".join(cells).rstrip())


def read_json_argument(what: str, value: str | None) -> bytes:
    """A JSON argument as bytes: ``@file.json`` reads a file, ``-`` reads stdin, anything
    else is the JSON itself; None is ``null``."""
    if value is None:
        return b"null"
    if value == "-":
        text, source = sys.stdin.read(), f"{what} from stdin"
    elif value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInput(f"{what}: cannot read {path}: {exc.strerror}") from None
        source = f"{what} in {path}"
    else:
        text, source = value, what
    try:
        return msgspec.json.encode(json.loads(text))
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            f'{source} is not valid JSON: {exc} (quote it for the shell: \'{{"name": "Ada"}}\', '
            "or pass @file.json or - for stdin)"
        ) from None
