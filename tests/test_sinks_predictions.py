"""predictions.csv and errors.csv cells: names that are not UTF-8, and spreadsheet formulas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tta_cli.outputs import BatchOutputs
from tta_cli.sinks.predictions import PREDICTION_COLUMNS, PredictionsWriter, csv_text, original_bytes
from tta_cli.sources.items import Batch, StreamItem


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


def test_jsonl_rows_keep_a_non_utf8_name_and_parse(tmp_path: Path) -> None:
    key = os.fsdecode(b"caf\xe9.png")
    items = [StreamItem(key, Path(key), label=1), StreamItem("b.png", Path("b.png"), label=0)]
    out = BatchOutputs(Batch(items, torch.zeros(2, 3, 4, 4), 0), torch.tensor([1, 2]), torch.tensor([0.5, 0.25]),
                       torch.tensor([1.0, 2.0]), torch.tensor([[1, 0, 2, 3, 4], [2, 1, 0, 3, 4]]),
                       torch.tensor([True, False]), (), False, 0.0)
    writer = PredictionsWriter(tmp_path / "p.jsonl", ["a", "b", "=c"], format="jsonl")
    writer.on_batch(out)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [list(r) for r in rows] == [PREDICTION_COLUMNS] * 2
    assert os.fsencode(rows[0]["path"]) == b"caf\xe9.png" and rows[1]["pred_name"] == "=c"  # no quoting
    assert rows[0]["correct"] == 1 and rows[1]["correct"] == 0 and rows[0]["top5"] == [1, 0, 2, 3, 4]
    assert rows[0]["used_for_update"] == 1 and rows[0]["timestamp"] is None
