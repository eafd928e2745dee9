"""predictions.csv and errors.csv cells: names that are not UTF-8, and spreadsheet formulas."""

from __future__ import annotations

import os

import pytest

from tta_cli.sinks.predictions import csv_text, original_bytes


@pytest.mark.parametrize(("name", "cell"), [
    (b"img0.png", "img0.png"),
    ("caf\u00e9.png".encode(), "caf\u00e9.png"),
    (b"caf\xe9.png", "caf\\xe9.png"),
    (b"a\\b\xff.png", "a\\x5cb\\xff.png"),  # a backslash in an escaped name is escaped too
    (b"=HYPERLINK(1).png", "'=HYPERLINK(1).png"),
    (b"+1.png", "'+1.png"),
    (b"-1.png", "'-1.png"),
    (b"@cmd.png", "'@cmd.png"),
    (b"\tx.png", "'\tx.png"),
    (b"\rx.png", "'\rx.png"),
    (b"'=x.png", "''=x.png"),
    (b"'plain.png", "'plain.png"),
    (b"=caf\xe9", "'=caf\\xe9"),
])
def test_cells_are_utf8_and_safe_and_give_the_name_back(name: bytes, cell: str) -> None:
    written = csv_text(os.fsdecode(name))
    assert written == cell
    written.encode("utf-8")  # never raises
    assert original_bytes(written) == name
