"""The CLI's tables and escapes as a terminal shows them: columns line up whatever the width
of the characters in a cell, and nothing in a cell can act on the terminal.

Pure functions, no server.
"""

from __future__ import annotations

import unicodedata

import pytest
from natflow_engine._cli_format import printable, table


def _columns(text: str) -> int:
    """What a terminal gives ``text``, for these names: two for wide, none for combining."""
    wide = ("W", "F")
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in wide else 1
        for c in text
    )


def test_columns_line_up_with_wide_and_combining_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Cells were padded by len(): a CJK or emoji name (two columns a character) pushed the
    next column right, a name with combining accents (none) pulled it left."""
    names = ["order", "注文処理", "🚀🚀launch", "cafe\u0301\u0301\u0301"]
    table(["WORKFLOW", "STATUS", "N"], [[name, "pending", "7"] for name in names], right=4)
    lines = capsys.readouterr().out.splitlines()
    status_at = {_columns(line[: line.index("STATUS")]) for line in lines[:1]}
    status_at |= {_columns(line[: line.index("pending")]) for line in lines[1:]}
    assert status_at == {10 + 2}, lines  # the widest name, 🚀🚀launch, and the gap
    assert {_columns(line) for line in lines} == {12 + 7 + 2 + 1}, "the right-aligned N too"


@pytest.mark.parametrize(
    ("shown", "escaped"),
    [
        ("failed\u202e", "failed\\u202e"),  # right-to-left override: reorders the line
        ("a\u2066b\u2069", "a\\u2066b\\u2069"),  # isolates
        ("zero\u200bwidth", "zero\\u200bwidth"),  # hides a character between
        ("tag\U000e0041", "tag\\U000e0041"),  # a tag character: invisible
        ("line\nnext\x1b[2J\x85", "line\\nnext\\x1b[2J\\x85"),  # C0 and C1, as before
    ],
)
def test_format_characters_are_escaped_as_controls_are(shown: str, escaped: str) -> None:
    """A step name with U+202E turned the rest of its row around ("failed" read "deliaf");
    zero-width characters made two different names look the same."""
    assert printable(shown) == escaped


def test_text_a_terminal_shows_as_it_is_stays_as_it_is() -> None:
    text = "注文 café́ 🚀 ok-1 \\ 'quoted' \u00e9"
    assert printable(text) == text
