r"""``predictions.csv`` and ``errors.csv``: written row by row and flushed every batch, so an
interrupted run keeps every prediction made so far.

Both files are UTF-8. Text cells (paths, class names, reasons) go through :func:`csv_text`:

* a file name that is not valid UTF-8 (Python holds it with surrogate escapes) is written with
  each byte that does not decode, and each backslash, as ``\xNN``: the Latin-1 name ``café.jpg``
  is written ``caf\xe9.jpg``. The file stays valid UTF-8 and :func:`original_bytes` gives back the
  exact name;
* a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``
  (also after leading ``'``, so it can be undone), so a spreadsheet shows it as text instead of
  running it as a formula. Numeric columns are never changed (a negative number stays a number).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import IO

from tta_cli.classes import class_ids_of
from tta_cli.outputs import BatchOutputs

PREDICTION_COLUMNS = [
    "index", "path", "frame", "timestamp", "pred", "pred_name", "pred_id", "confidence", "entropy", "top5",
    "used_for_update", "label", "correct",
]


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def csv_text(value: str) -> str:
    """``value`` safe for a UTF-8 CSV opened in a spreadsheet (see the module's docstring)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes of bytes that are not UTF-8 (os.fsdecode)
        raw = os.fsencode(value).replace(b"\\", b"\\x5c")  # so that every escape reads back
        value = raw.decode("utf-8", "backslashreplace")
    return "'" + value if _needs_quote(value) else value


def _needs_quote(value: str) -> bool:
    """Starts with a formula character, after any quotes (so that quoting can always be undone)."""
    return value.lstrip("'").startswith(_FORMULA_START)


def original_bytes(cell: str) -> bytes:
    """The file name's bytes from a path cell written by :func:`csv_text` (for names that were not
    not UTF-8; in a UTF-8 name, a backslash, ``x`` and two hex digits read back as that byte)."""
    if cell.startswith("'") and _needs_quote(cell):
        cell = cell[1:]
    return _ESCAPED_BYTE.sub(lambda match: bytes([int(match[1], 16)]), cell.encode("utf-8"))


class PredictionsWriter:
    def __init__(self, path: Path, class_names: list[str], append: bool = False) -> None:
        """``append``: continue a file cut back to a row boundary (``--resume``)."""
        self.class_names = class_names
        self.class_ids = class_ids_of(class_names)
        self._file: IO[str] = path.open("a" if append else "w", newline="", encoding="utf-8")
        if not append:
            self._write_rows([PREDICTION_COLUMNS])
        self.rows = 0

    def _write_rows(self, rows: list[list[object]]) -> None:
        """Whole rows in one write, flushed: the file only ever ends on a row boundary."""
        text = io.StringIO()
        csv.writer(text).writerows(rows)
        self._file.write(text.getvalue())
        self._file.flush()

    def on_batch(self, out: BatchOutputs) -> None:
        labels = out.batch.labels
        correct = out.correct
        rows: list[list[object]] = []
        for i, item in enumerate(out.batch.items):
            pred = int(out.pred[i])
            known = 0 <= pred < len(self.class_names)  # -1: non-finite logits, no prediction
            rows.append([
                out.batch.first_index + i,
                csv_text(item.key),
                "" if item.frame is None else item.frame,
                "" if item.timestamp is None else f"{item.timestamp:.3f}",
                pred,
                csv_text(self.class_names[pred]) if known else "",
                csv_text(self.class_ids[pred]) if known and pred < len(self.class_ids) else "",
                f"{float(out.confidence[i]):.6f}",
                f"{float(out.entropy[i]):.6f}",
                " ".join(str(int(j)) for j in out.top5[i]),
                int(bool(out.used[i])),
                "" if labels is None else int(labels[i]),
                "" if correct is None else int(bool(correct[i])),
            ])
        self._write_rows(rows)
        self.rows += len(out.batch.items)

    def close(self) -> None:
        self._file.close()


class ErrorsWriter:
    """``errors.csv``: every input that was skipped, with the reason; created on the first one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self.append = append
        self._file: IO[str] | None = None
        self._writer: csv.writer | None = None  # type: ignore[valid-type]
        self.rows = 0

    def add(self, key: str, reason: str) -> None:
        if self._file is None:
            resumed = self.append and self.path.exists()
            self._file = self.path.open("a" if resumed else "w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            if not resumed:
                self._writer.writerow(["path", "reason"])
        text = io.StringIO()
        csv.writer(text).writerow([csv_text(key), csv_text(reason)])
        self._file.write(text.getvalue())  # one whole row per write
        self.rows += 1
        self._file.flush()

    def on_batch(self, out: BatchOutputs) -> None:
        for item, reason in out.batch.skipped:
            self.add(item.key, reason)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
