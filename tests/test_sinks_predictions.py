"""predictions.csv and errors.csv cells: names that are not UTF-8, and spreadsheet formulas."""

from __future__ import annotations

import errno
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


def test_jsonl_rows_keep_a_non_utf8_name_and_parse_strictly(tmp_path: Path) -> None:
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
    assert rows[0]["path"] == "caf\\xe9.png" and rows[1]["pred_name"] == "=c"  # escaped as in the CSV; no quoting
    assert original_bytes(rows[0]["path"]) == b"caf\xe9.png"
    assert rows[0]["correct"] == 1 and rows[1]["correct"] == 0 and rows[0]["top5"] == [1, 0, 2, 3, 4]
    assert rows[0]["used_for_update"] == 1 and rows[0]["timestamp"] is None


def _outputs(n: int, first: int = 0) -> BatchOutputs:
    items = [StreamItem(f"img{first + i}.png", Path(f"img{first + i}.png")) for i in range(n)]
    return BatchOutputs(Batch(items, torch.zeros(n, 3, 4, 4), first), torch.zeros(n, dtype=torch.long),
                        torch.full((n,), 0.5), torch.ones(n), torch.zeros(n, 5, dtype=torch.long),
                        torch.zeros(n, dtype=torch.bool), (), False, 0.0)


@pytest.mark.parametrize("format", ["csv", "jsonl"])
def test_a_full_disk_cuts_back_to_whole_rows_and_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 format: str) -> None:
    """Issue #24.9: the last row was cut in half and the error named no file."""
    from tta_cli.sinks import predictions

    path = tmp_path / f"predictions.{format}"
    writer = PredictionsWriter(path, ["a"], format=format)
    writer.on_batch(_outputs(3))
    whole = path.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 10:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(predictions.os, "write", half_then_full)
    with pytest.raises(OSError) as failure:
        writer.on_batch(_outputs(3, first=3))
    assert failure.value.errno == errno.ENOSPC and failure.value.filename == str(path)
    assert path.read_bytes() == whole  # the half-written rows are gone
    writer.close()


def test_a_csv_batch_is_written_byte_for_byte(tmp_path: Path) -> None:
    """Every kind of cell at once, against the exact text: a frame and timestamp, a -1 prediction
    (non-finite logits), labels and correctness, a sampled source reference, float rounding."""
    items = [StreamItem("v.mp4#0", Path("v.mp4"), label=1, frame=0, timestamp=0.0),
             StreamItem("=x.png", Path("=x.png"), label=2, frame=None, timestamp=None),
             StreamItem("c.png", Path("c.png"), label=0, frame=7, timestamp=1.23456)]
    out = BatchOutputs(Batch(items, torch.zeros(3, 3, 4, 4), 5), torch.tensor([1, -1, 2]),
                       torch.tensor([0.123456789, 1.0, 1e-7]), torch.tensor([2.0, float("nan"), 0.5]),
                       torch.tensor([[1, 0, 2, 3, 4], [0, 1, 2, 3, 4], [2, 1, 0, 3, 4]]),
                       torch.tensor([True, False, True]), (), False, 0.0,
                       source_rows=torch.tensor([0, 2]), source_logits=torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]]))
    writer = PredictionsWriter(tmp_path / "p.csv", ["a", "b", "=c"], source_columns=True)
    writer.on_batch(out)
    writer.close()
    assert writer.rows == 3
    assert (tmp_path / "p.csv").read_bytes() == (
        b"index,path,frame,timestamp,pred,pred_name,pred_id,confidence,entropy,top5,used_for_update,label,correct,"
        b"source_pred,source_pred_name\r\n"
        b"5,v.mp4#0,0,0.000,1,b,b,0.123457,2.000000,1 0 2 3 4,1,1,1,1,b\r\n"
        b"6,'=x.png,,,-1,,,1.000000,nan,0 1 2 3 4,0,2,0,,\r\n"
        b"7,c.png,7,1.235,2,'=c,'=c,0.000000,0.500000,2 1 0 3 4,1,0,0,0,a\r\n")
