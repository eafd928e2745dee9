"""``--resume``: the run state kept in ``OUT/checkpoint.pt`` and how a run continues from it.

Every ``--checkpoint-every`` batches (and at least every ``CHECKPOINT_SECONDS``) the state after
the last delivered batch is written to a temporary file and renamed over the previous checkpoint,
so a kill -9 or a power cut leaves the last complete one. It holds the method's state (gathered by
the run through ``TTAMethod.state_for_resume``: modules, optimiser, loss scaler, generator, logs,
EMAs, memory banks) and the collapse monitor's, the RNG states, the stream position (items consumed,
images decoded), the running totals and the byte sizes of ``predictions.csv`` and ``errors.csv`` at
that point. Only tensors, numbers, strings, lists and dicts are stored, read back with
``torch.load(weights_only=True)``.

A resumed run truncates the CSVs to those sizes, skips the consumed items (image items are sliced
off, never decoded; a video is decoded up to the position, its frames dropped) and carries on: the
same predictions, model and counts as a run that was never stopped.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tta_cli import signals
from tta_cli.atomic import atomic_write
from tta_cli.config import AdaptConfig
from tta_cli.errors import TTAError
from tta_cli.models import load_error_reason
from tta_cli.outputs import BatchOutputs, Totals
from tta_cli.sources.items import Batch
from tta_cli.sources.stream import ImagePart, Stream

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_EVERY = 50
"""Batches between checkpoints (``--checkpoint-every``; 0: none)."""
CHECKPOINT_SECONDS = 300.0
"""A checkpoint is also written once this long has passed since the last one."""
KILL_AFTER_ENV = "TTA_TEST_KILL_AFTER_BATCHES"
"""Test hook: kill -9 this process once that many batches are delivered (fault injection)."""
STOP_AFTER_ENV = "TTA_TEST_SIGNAL_AFTER_BATCHES"
"""Test hook: ``N:SIGNAME`` sends the signal to this process after N batches (Ctrl-C, SIGTERM)."""


def rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global generators (CPU and CUDA)."""
    states: dict[str, Any] = {"python": _plain_python_state(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return states
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _plain_python_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


@dataclass
class Position:
    """Where a run stands: stream items consumed (read or skipped), images decoded, batches."""

    items: int = 0
    images: int = 0
    batches: int = 0


@dataclass
class ResumePoint:
    """A checkpoint as read back."""

    method: dict[str, Any]
    rng: dict[str, Any]
    position: Position
    totals: Totals
    predictions_bytes: int
    errors_bytes: int
    sinks: dict[str, Any]
    weights_sha256: str | None = None
    """The source model's weights when the run started (``models.state_dict_sha256``)."""


def resume_point(out: Path, csv_files: tuple[Path, ...]) -> ResumePoint | None:
    """The checkpoint to resume from; None (start from the beginning) for a run stopped before it
    wrote a checkpoint or any row."""
    if not (out / CHECKPOINT).is_file() and not any(_has_rows(path) for path in csv_files):
        return None
    return load_checkpoint(out)


def _has_rows(path: Path) -> bool:
    """More than a header line (a JSONL file has none)."""
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        lines = handle.read(1 << 16).count(b"\n")
    return lines > (0 if path.suffix == ".jsonl" else 1)


def load_checkpoint(out: Path) -> ResumePoint:
    path = out / CHECKPOINT
    if not path.is_file():
        raise TTAError(f"no checkpoint in {out}: the run stopped before its first checkpoint",
                       "run it again from the start (with --overwrite)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        totals = Totals(**{f.name: state["totals"][f.name] for f in fields(Totals) if f.name in state["totals"]})
        return ResumePoint(state["method"], state["rng"], Position(**state["position"]), totals,
                           int(state["predictions_bytes"]), int(state["errors_bytes"]), state.get("sinks", {}),
                           state.get("weights_sha256"))
    except Exception as err:  # torch's errors (unpickling, zip) share no base class
        reason = load_error_reason(err) if not isinstance(err, KeyError) else f"no {err} in it"
        raise TTAError(f"cannot read the checkpoint {path}: {reason}",
                       "run it again from the start, with --overwrite") from err


def check_same_weights(point: ResumePoint, weights_sha256: str, out: Path) -> None:
    """A checkpoint keeps only the tensors the run changed; the rest comes from the model as loaded
    now, which must therefore be the one the run started from."""
    if point.weights_sha256 is not None and point.weights_sha256 != weights_sha256:
        raise TTAError(f"cannot resume {out}: the model's weights differ from those the run started with "
                       f"(sha256 {weights_sha256[:12]} now, {point.weights_sha256[:12]} then)",
                       "restore the model the run used, or run it again from the start with --overwrite")


RunState = Callable[[], dict[str, Any]]
"""What the run hands the checkpointer: a call that gathers the method's and the sinks' state,
``{"method": {...}, "sinks": {name: {...}}}`` in tensors, numbers, strings, lists and dicts."""


class Checkpointer:
    """The last sink: counts the position and writes the checkpoint when one is due.

    It never reads the method: ``state`` (the run's) gathers what the checkpoint keeps of the method
    and the sinks; ``totals`` are the run's counts, updated by the engine before the sinks."""

    def __init__(self, out: Path, state: RunState, csv_files: tuple[Path, Path], every: int, totals: Totals,
                 start: ResumePoint | None = None, seconds: float = CHECKPOINT_SECONDS) -> None:
        self.out, self.state, self.csv_files, self.every, self.seconds = out, state, csv_files, every, seconds
        self.position = start.position if start else Position()
        self.totals = totals
        self.last_save = time.monotonic()
        self.written = 0
        self._kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
        self._signal_after = os.environ.get(STOP_AFTER_ENV, "")

    def on_batch(self, outputs: BatchOutputs) -> None:
        batch = outputs.batch
        self.position.items += len(batch.items) + len(batch.skipped)
        self.position.images += len(batch.items)
        self.position.batches += 1
        due = self.every > 0 and (self.position.batches % self.every == 0
                                  or time.monotonic() - self.last_save > self.seconds)
        if due:
            self.save()
        self._test_hooks()
        signals.check()  # an interrupt that something swallowed still stops the run here

    def save(self) -> None:
        gathered = self.state()
        state = {
            "method": gathered["method"],
            "rng": rng_states(),
            "position": asdict(self.position),
            "totals": asdict(self.totals),
            "predictions_bytes": _size(self.csv_files[0]),
            "errors_bytes": _size(self.csv_files[1]),
            "sinks": gathered.get("sinks", {}),
            "weights_sha256": gathered.get("weights_sha256"),
        }
        atomic_write(self.out / CHECKPOINT, lambda path: _save(state, path, self.out / CHECKPOINT))
        self.last_save = time.monotonic()
        self.written += 1

    def _test_hooks(self) -> None:
        if self._kill_after and self.position.batches >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self._signal_after:
            count, _, name = self._signal_after.partition(":")
            if self.position.batches == int(count):
                os.kill(os.getpid(), getattr(signal, name or "SIGINT"))


def _save(state: dict[str, Any], tmp: Path, final: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk is an ``OSError`` naming the
    checkpoint (torch's own writer reports it as an unrelated RuntimeError)."""
    try:
        with tmp.open("wb") as handle:
            torch.save(state, handle)
    except (OSError, RuntimeError) as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OSError):  # torch's writer fails again on exit
            cause = cause.__context__
        if cause is None:
            raise
        raise OSError(cause.errno, cause.strerror, str(final)) from err


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def truncate_outputs(csv_files: tuple[Path, Path], point: ResumePoint) -> None:
    """Cut ``predictions.csv`` and ``errors.csv`` back to the checkpoint (whole rows only)."""
    for path, size in zip(csv_files, (point.predictions_bytes, point.errors_bytes), strict=True):
        if not path.exists():
            continue
        if size == 0:
            path.unlink()
        else:
            with path.open("r+b") as handle:
                handle.truncate(size)


def skip_consumed(stream: Stream, items: int) -> tuple[Stream, int]:
    """The stream without its first ``items`` items: leading image items are sliced off (never
    decoded); what remains to skip from a video on is returned, to drop after decoding."""
    parts = list(stream.parts)
    while items and parts and isinstance(parts[0], ImagePart):
        part = parts[0]
        if len(part.items) <= items:
            items -= len(part.items)
            parts.pop(0)
        else:
            parts[0] = ImagePart(part.items[items:])
            items = 0
    return Stream(parts, stream.cache, stream.shuffled, stream.videos, stream.labels_from, stream.label_notes), items


def continued(batches: Iterator[Batch], first_index: int) -> Iterator[Batch]:
    """Batches of a resumed stream, numbered on from the decoded images before it."""
    for batch in batches:
        batch.first_index += first_index
        yield batch


def config_from_record(record: dict[str, Any], out: Path) -> AdaptConfig:
    """The configuration a run recorded in its run.json, to resume it in ``out``."""
    paths = {"checkpoint", "labels", "clean", "out"}
    values = {f.name: record[f.name] for f in fields(AdaptConfig) if f.name in record}
    for name in paths:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    values["inputs"] = [Path(p) for p in values.get("inputs", [])]
    if isinstance(values.get("source_reference"), bool):  # recorded before the sampled reference
        values["source_reference"] = "all" if values["source_reference"] else "off"
    values["out"] = out
    return AdaptConfig(**values)
