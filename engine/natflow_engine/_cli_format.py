"""Output of the ``natflow`` commands: aligned tables, JSON, input from files or stdin.

Plain formatting on purpose: the tables are a handful of short columns, and a table or colour
library would be one more dependency of every worker image for what 20 lines do. Only the
width a terminal gives a cell comes from ``wcwidth``: that is Unicode's tables, not 20 lines.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from wcwidth import wcswidth

from ._codec import parse_json_text
from ._errors import InvalidInput


def print_json(value: Any) -> None:
    """``value`` as indented JSON (msgspec structs, datetimes and all)."""
    print(msgspec.json.format(msgspec.json.encode(value), indent=2).decode())


class _Escapes(dict[int, str]):
    """For ``str.translate``: each character to itself, or to its escape where a terminal would
    act on it. C0 and C1 controls and DEL: error messages, cancel reasons and step names come
    from workflow code, run input or whoever cancels, and a newline faked a table row, an
    escape sequence set the terminal's title or cleared it. Format characters (category Cf)
    too: a bidi override (U+202E) turned the rest of a line around, zero-width ones hid text.
    Filled as characters are met: a table of all 1.1 million took a quarter second per command.
    """

    def __missing__(self, code: int) -> str:
        char = chr(code)
        # repr writes each of these as its escape: \x.., \u.... or \U........
        hidden = code < 0x20 or 0x7F <= code < 0xA0 or unicodedata.category(char) == "Cf"
        self[code] = escaped = repr(char)[1:-1] if hidden else char
        return escaped


_ESCAPES = _Escapes()


def printable(text: str) -> str:
    """``text`` with its control and format characters escaped (``\\n``, ``\\x1b``,
    ``\\u202e``), for a terminal."""
    return text.translate(_ESCAPES)


def display_width(text: str) -> int:
    """The columns a terminal gives ``text``: two for each wide (CJK, emoji) character, none
    for a combining accent. ``len()`` counted characters, so such names pushed columns out."""
    width = wcswidth(text)
    return width if width >= 0 else len(text)  # -1: a control character; printable() escapes them


def _pad(cell: str, width: int, right: bool) -> str:
    fill = " " * max(0, width - display_width(cell))
    return fill + cell if right else cell + fill


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 0) -> None:
    """Print aligned columns, control characters escaped; the last column is not padded.
    ``right`` is a bit mask of the columns aligned right (numbers)."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [display_width(h) for h in header]
    for row in rows:
        widths = [max(w, display_width(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (header, *rows):
        cells = [
            _pad(cell, w, bool(right >> i & 1))
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
