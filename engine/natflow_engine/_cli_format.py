"""Output of the ``natflow`` commands: aligned tables, JSON, input from files or stdin.

Plain formatting on purpose: the tables are a handful of short columns, and a table or colour
library would be one more dependency of every worker image for what 20 lines do.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ._codec import parse_json_text
from ._errors import InvalidInput


def print_json(value: Any) -> None:
    """``value`` as indented JSON (msgspec structs, datetimes and all)."""
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


# C0 and C1 control characters, DEL: shown escaped. Error messages, cancel reasons, step
# names come from workflow code, run input or whoever cancels: a newline faked a table row,
# an escape sequence set the terminal's title or cleared it.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\n``, ``\x1b``), for a terminal."""
    return text.translate(_CONTROLS)


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 0) -> None:
    """Print aligned columns, control characters escaped; the last column is not padded.
    ``right`` is a bit mask of the columns aligned right (numbers)."""
    rows = [[printable(cell) for cell in row] for row in rows]
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
        source = f"{what} from stdin"
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{source} is not UTF-8 text ({exc.reason})") from None
    elif value.startswith("@"):
        path = Path(value[1:])
        source = f"{what} in {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"{what}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{source} is not UTF-8 text ({exc.reason})") from None
    else:
        text, source = value, what
    return parse_json_text(
        source,
        text,
        'Quote it for the shell (\'{"name": "Ada"}\'), or pass @file.json or - for stdin.',
    )
