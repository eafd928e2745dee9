"""``predictions.csv`` and ``errors.csv``: written row by row and flushed every batch, so an
interrupted run keeps every prediction made so far."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import IO

from tta_cli.classes import class_ids_of
from tta_cli.engine import BatchOutputs

PREDICTION_COLUMNS = [
    "index", "path", "frame", "timestamp", "pred", "pred_name", "pred_id", "confidence", "entropy", "top5",
    "used_for_update", "label", "correct",
]


class PredictionsWriter:
    def __init__(self, path: Path, class_names: list[str]) -> None:
        self.class_names = class_names
        self.class_ids = class_ids_of(class_names)
        self._file: IO[str] = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(PREDICTION_COLUMNS)
        self.rows = 0

    def on_batch(self, out: BatchOutputs) -> None:
        labels = out.batch.labels
        correct = out.correct
        for i, item in enumerate(out.batch.items):
            pred = int(out.pred[i])
            self._writer.writerow([
                out.batch.first_index + i,
                item.key,
                "" if item.frame is None else item.frame,
                "" if item.timestamp is None else f"{item.timestamp:.3f}",
                pred,
                self.class_names[pred] if pred < len(self.class_names) else pred,
                self.class_ids[pred] if pred < len(self.class_ids) else pred,
                f"{float(out.confidence[i]):.6f}",
                f"{float(out.entropy[i]):.6f}",
                " ".join(str(int(j)) for j in out.top5[i]),
                int(bool(out.used[i])),
                "" if labels is None else int(labels[i]),
                "" if correct is None else int(bool(correct[i])),
            ])
        self.rows += len(out.batch.items)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ErrorsWriter:
    """``errors.csv``: every input that was skipped, with the reason; created on the first one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._writer: csv.writer | None = None  # type: ignore[valid-type]
        self.rows = 0

    def add(self, key: str, reason: str) -> None:
        if self._file is None:
            self._file = self.path.open("w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file)
            self._writer.writerow(["path", "reason"])
        self._writer.writerow([key, reason])  # type: ignore[union-attr]
        self.rows += 1
        self._file.flush()

    def on_batch(self, out: BatchOutputs) -> None:
        for item, reason in out.batch.skipped:
            self.add(item.key, reason)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
