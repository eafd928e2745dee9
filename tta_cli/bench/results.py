"""What ``tta bench`` records per run: results.csv (one row per run) and curves.csv (per window of
images), their rows, and the collapse test on the last tenth of a stream."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tta_cli.methods import get_method_class, list_methods
from tta_cli.outputs import BatchOutputs

WINDOW = 64
"""Images per point of the stream curves (one batch at B = 64; 64 batches at B = 1)."""
ONE_CLASS_SHARE = 0.9
"""A model that gives one class to this share of the last tenth, mostly wrongly, has collapsed."""
RESULTS = "results.csv"
CURVES = "curves.csv"


@dataclass
class RunResult:
    """One method on one stream."""

    model: str
    setting: str
    corruption: str
    method: str
    batch_size: int
    images: int
    correct: int
    accuracy: float
    last_tenth_accuracy: float
    collapsed: bool
    resets: int
    used_share: float
    mean_entropy: float
    adapt_seconds: float
    wall_seconds: float
    lr: float | None
    last_tenth_top_share: float | None = None
    """Share of the last tenth's predictions that go to its most predicted class."""
    seed: int = 0
    """The stream seed (its order); the corrupted images are the same for every seed."""
    images_per_second: float | None = None
    """Images over adaptation seconds (forward, backward, update; decoding excluded)."""
    online_k: int | None = None
    """ceil(source's images/s / this method's) on the same stream; None without a source run."""
    online_accuracy: float | None = None
    """Accuracy when adapting on every online_k-th batch only (equal to accuracy when k = 1)."""

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.model, self.setting, self.corruption, self.method, self.seed)


RESULT_FIELDS = [f.name for f in fields(RunResult)]
CURVE_FIELDS = ["model", "setting", "corruption", "method", "seed", "window", "images", "n", "correct",
                "entropy_sum", "resets"]


class CurveRecorder:
    """A sink: per-batch correct counts (for the last-tenth collapse test) and windowed curves."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, int, torch.Tensor]] = []
        self.windows: list[dict[str, float]] = []
        self._open: dict[str, float] = {}
        self.images = 0

    def on_batch(self, out: BatchOutputs) -> None:
        n = len(out.batch.items)
        if not n:
            return
        correct = out.correct
        hits = int(correct.sum()) if correct is not None else 0
        self.per_batch.append((n, hits, out.pred))
        self.images += n
        w = self._open or {"n": 0, "correct": 0, "entropy_sum": 0.0, "resets": 0}
        w["n"] += n
        w["correct"] += hits
        w["entropy_sum"] += float(out.entropy.sum())
        w["resets"] += int(out.reset)
        self._open = w
        if w["n"] >= WINDOW:
            self._close()

    def _close(self) -> None:
        if self._open:
            self.windows.append(self._open | {"images": self.images})
            self._open = {}

    def finish(self) -> list[dict[str, float]]:
        self._close()
        return self.windows

    def last_tenth(self) -> tuple[float, float]:
        """(accuracy, share of the most predicted class) over the last tenth of the stream, in
        whole batches and at least one window (a tenth of a short stream is too noisy)."""
        need = max(min(WINDOW, self.images), self.images // 10)
        n = hits = 0
        preds: list[torch.Tensor] = []
        for size, correct, pred in reversed(self.per_batch):
            n += size
            hits += correct
            preds.append(pred)
            if n >= need:
                break
        if not n:
            return 0.0, 0.0
        top = int(torch.cat(preds).bincount().max())
        return hits / n, top / n

    def last_tenth_accuracy(self) -> float:
        return self.last_tenth()[0]


def is_collapsed(accuracy: float, top_share: float, num_classes: int) -> bool:
    """At or below chance (the spec's test), or one class for nearly everything and mostly wrong:
    a model collapsed onto one class scores that class's share of the stream, which on a shuffled
    stream is a little above chance as often as below it."""
    return accuracy <= 1.0 / num_classes or (top_share >= ONE_CLASS_SHARE and accuracy < 0.5)


def _coerce(name: str, value: str) -> Any:
    kind = {f.name: f.type for f in fields(RunResult)}[name]
    if value == "":
        return None
    if kind in ("int", "int | None"):
        return int(value)
    if kind in ("float", "float | None"):
        return float(value)
    if kind == "bool":
        return value == "True"
    return value


def read_results(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return [{k: _coerce(k, v) for k, v in row.items() if k in RESULT_FIELDS} for row in csv.DictReader(f)]


def append_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def save_run(out: Path, result: RunResult, windows: list[dict[str, float]]) -> None:
    """Append one run to results.csv and curves.csv as soon as it ends (a long benchmark resumes)."""
    row = asdict(result)
    for key in ("accuracy", "last_tenth_accuracy", "used_share", "mean_entropy", "last_tenth_top_share",
                "images_per_second", "online_accuracy"):
        row[key] = "" if row[key] is None else f"{row[key]:.6f}"
    append_rows(out / RESULTS, RESULT_FIELDS, [row])
    head = {"model": result.model, "setting": result.setting, "corruption": result.corruption,
            "method": result.method, "seed": result.seed}
    curve = [head | {"window": i} | {k: w[k] for k in ("images", "n", "correct", "entropy_sum", "resets")}
             for i, w in enumerate(windows)]
    append_rows(out / CURVES, CURVE_FIELDS, curve)


def is_source(name: str) -> bool:
    """The method (a results row's ``method``) is the source model itself
    (``TTAMethod.changes_predictions``): the runs every other method is compared with."""
    return name in list_methods() and not get_method_class(name).changes_predictions
