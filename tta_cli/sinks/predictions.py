r"""``predictions.csv`` and ``errors.csv``: written row by row and flushed every batch, so an
interrupted run keeps every prediction made so far.

Both files are UTF-8. Text cells (paths, class names, reasons) go through :func:`csv_text`:

* a file name that is not valid UTF-8 (Python holds it with surrogate escapes) is written with
  each byte that does not decode, and each backslash, as ``\xNN``: the Latin-1 name ``café.jpg``
  is written ``caf\xe9.jpg``. The file stays valid UTF-8 and :func:`original_bytes` gives back the
  exact name. ``predictions.jsonl`` and the export folder's ``manifest.csv`` write names the same
  way (one encoding everywhere; strict JSON parsers read every line);
* a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'``
  (also after leading ``'``, so it can be undone), so a spreadsheet shows it as text instead of
  running it as a formula. Numeric columns are never changed (a negative number stays a number).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from pathlib import Path

from tta_cli.choices import PREDICTION_FORMATS
from tta_cli.classes import class_ids_of
from tta_cli.outputs import BatchOutputs
from tta_cli.ownership import record_path

PREDICTION_COLUMNS = [
    "index", "path", "frame", "timestamp", "pred", "pred_name", "pred_id", "confidence", "entropy", "top5",
    "used_for_update", "label", "correct",
]
SOURCE_COLUMNS = ["source_pred", "source_pred_name"]
"""Written when a source reference runs beside the method (``tta_cli.reference``); empty for the
rows a sampled reference left out."""


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")


def utf8_text(value: str) -> str:
    """``value`` as valid UTF-8 text: a name that is not UTF-8 gets ``\\xNN`` escapes (see the
    module's docstring; :func:`original_bytes` gives the bytes back)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes of bytes that are not UTF-8 (os.fsdecode)
        raw = os.fsencode(value).replace(b"\\", b"\\x5c")  # so that every escape reads back
        value = raw.decode("utf-8", "backslashreplace")
    return value


def csv_text(value: str) -> str:
    """``value`` safe for a UTF-8 CSV opened in a spreadsheet (see the module's docstring)."""
    value = utf8_text(value)
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
    """``predictions.csv``, or with ``format="jsonl"`` ``predictions.jsonl``: one JSON object per
    row with the same fields, typed (numbers as numbers, ``top5`` a list, empty cells ``null``) and
    with no spreadsheet quoting; a name that is not UTF-8 is escaped as in the CSV (``\\xNN``).

    ``source_columns`` adds the columns ``source_pred`` and ``source_pred_name``: the source
    reference's prediction of each image it referenced (``BatchOutputs.source_rows``)."""

    def __init__(self, path: Path, class_names: list[str], format: str = "csv",
                 source_columns: bool = False, append: bool = False) -> None:
        """``append``: continue a file cut back to a row boundary (``--resume``)."""
        if format not in PREDICTION_FORMATS:
            raise ValueError(f"format must be one of {', '.join(PREDICTION_FORMATS)}, got {format!r}")
        self.class_names = class_names
        self.class_ids = class_ids_of(class_names)
        self.format = format
        self.source_columns = source_columns
        self.columns = PREDICTION_COLUMNS + (SOURCE_COLUMNS if source_columns else [])
        record_path(path)  # tta_cli.ownership: --overwrite may remove it later
        self._file = RowFile(path, append)
        if format == "csv" and not append:
            self._write_rows(_csv_text_of([self.columns]))
        self.rows = 0

    def on_batch(self, out: BatchOutputs) -> None:
        # the columns as Python lists at once: indexing tensors per cell costs more than the rest
        preds, top5, used = out.pred.tolist(), out.top5.tolist(), out.used.tolist()
        confidences, entropies = out.confidence.tolist(), out.entropy.tolist()
        labels = None if out.batch.labels is None else out.batch.labels.tolist()
        correct = None if out.correct is None else out.correct.tolist()
        source = self._source_by_row(out) if self.source_columns else {}
        rows: list[list[object]] = []
        for i, item in enumerate(out.batch.items):
            pred = int(preds[i])
            known = 0 <= pred < len(self.class_names)  # -1: non-finite logits, no prediction
            rows.append([
                out.batch.first_index + i,
                item.key,
                item.frame,
                None if item.timestamp is None else round(item.timestamp, 3),
                pred,
                self.class_names[pred] if known else None,
                self.class_ids[pred] if known and pred < len(self.class_ids) else None,
                round(confidences[i], 6),
                round(entropies[i], 6),
                [int(j) for j in top5[i]],
                int(bool(used[i])),
                None if labels is None else int(labels[i]),
                None if correct is None else int(bool(correct[i])),
                *(self._source_cells(source.get(i)) if self.source_columns else []),
            ])
        if self.format == "jsonl":
            text = "".join(_json_line(dict(zip(self.columns, row, strict=True))) + "\n" for row in rows)
        else:
            text = _csv_text_of([_csv_row(self.columns, row) for row in rows])
        self._write_rows(text)
        self.rows += len(out.batch.items)

    def _write_rows(self, text: str) -> None:
        """Whole rows in one write: the file always ends on a row boundary."""
        self._file.write(text)

    @staticmethod
    def _source_by_row(out: BatchOutputs) -> dict[int, int]:
        source = out.source_pred()
        if source is None or out.source_rows is None:
            return {}
        return dict(zip(out.source_rows.tolist(), source.tolist(), strict=True))

    def _source_cells(self, pred: int | None) -> list[object]:
        if pred is None:
            return [None, None]
        return [pred, self.class_names[pred] if 0 <= pred < len(self.class_names) else None]

    def close(self) -> None:
        self._file.close()


class RowFile:
    """A file written whole rows at a time, straight to the file (no buffer): a write that fails
    (a full disk) is cut back to the last whole row, and its error names the file."""

    def __init__(self, path: Path, append: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
        self.path = path
        self._fd: int | None = os.open(path, flags, 0o644)
        self.size = os.fstat(self._fd).st_size

    def write(self, text: str) -> None:
        assert self._fd is not None, "closed"
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        self.size += len(text.encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _csv_text_of(rows: list[list[object]]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def _csv_row(columns: list[str], row: list[object]) -> list[object]:
    """Text cells through :func:`csv_text`, fixed decimals, top-5 space-separated, None empty."""
    cells: list[object] = []
    for column, value in zip(columns, row, strict=True):
        if value is None:
            cells.append("")
        elif isinstance(value, str):
            cells.append(csv_text(value))
        elif column == "timestamp":
            cells.append(f"{value:.3f}")
        elif column in ("confidence", "entropy"):
            cells.append(f"{value:.6f}")
        elif column == "top5":
            cells.append(" ".join(str(j) for j in value))  # type: ignore[attr-defined]
        else:
            cells.append(value)
    return cells


def _json_line(record: dict[str, object]) -> str:
    """One JSON object of valid UTF-8 (a name that is not UTF-8 escaped as in the CSV)."""
    return json.dumps({k: utf8_text(v) if isinstance(v, str) else v for k, v in record.items()}, ensure_ascii=False)


class ErrorsWriter:
    """``errors.csv``: every input that was skipped, with the reason; created on the first one."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        self.append = append
        self._file: RowFile | None = None
        self.rows = 0

    def add(self, key: str, reason: str) -> None:
        if self._file is None:
            resumed = self.append and self.path.exists()
            record_path(self.path)
            self._file = RowFile(self.path, append=resumed)
            if not resumed:
                self._file.write(_csv_text_of([["path", "reason"]]))
        self._file.write(_csv_text_of([[csv_text(key), csv_text(reason)]]))  # one whole row per write
        self.rows += 1

    def on_batch(self, out: BatchOutputs) -> None:
        for item, reason in out.batch.skipped:
            self.add(item.key, reason)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
