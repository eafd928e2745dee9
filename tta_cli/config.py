"""The configuration of one ``tta adapt`` run (method hyperparameters live in each method's dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

MAX_IMAGE_PIXELS = 89_478_485
"""PIL's default decompression-bomb limit; PIL itself only warns up to twice this, the loader skips
every image above it (``--max-pixels``)."""


def default_workers() -> int:
    """Decoding workers for this machine now (``tta_cli.threads.decode_workers``)."""
    from tta_cli.threads import decode_workers  # imports torch: only when a run starts

    return decode_workers()


@dataclass
class AdaptConfig:
    inputs: list[Path]
    model: str
    method: str = "auto"
    pretrained: bool = True
    checkpoint: Path | None = None
    num_classes: int | None = None
    labels: Path | None = None
    labels_encoding: str = "utf-8"
    """Text encoding of ``labels`` and of list inputs (UTF-8: a byte-order mark is skipped)."""
    labels_from_folders: str = "auto"
    """auto, names, index or off (see ``tta_cli.sources.folder.folder_labels``)."""
    clean: Path | None = None
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    workers: int | None = None
    out: Path | None = None
    overwrite: bool = False
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """Method hyperparameters (``--lr``, ``--steps``, ``--episodic``, ``--set key=value``)."""
    quiet: bool = False
    strict: bool = False
    precision: str = "auto"
    """auto (bf16 where measured to keep results on hardware with bf16 units, else fp32), fp32, bf16
    or fp16 (autocast; see docs/PERFORMANCE.md)."""
    compile: bool = False
    channels_last: str = "auto"
    """auto (conv nets on CUDA), on or off."""
    shuffle: bool = False
    """Shuffle the whole stream (all inputs together) with ``seed``."""
    every: int | None = None
    fps: float | None = None
    start: float = 0.0
    end: float | None = None
    max_frames: int | None = None
    """Videos: which frames enter the stream (see ``tta_cli.sources.video.VideoOptions``)."""
    on_collapse: str = "reset"
    """reset, stop or warn: what a label-free collapse event does (``tta_cli.monitor``)."""
    source_reference: str = "sampled"
    """sampled, all or off: the images a frozen source copy predicts beside the method, for the
    collapse signals, the health verdict and the ``source_pred`` column (``tta_cli.reference``)."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels are skipped (decompression bombs); 0: no limit."""
    predict_only: bool = False
    """``tta predict``: the ``source`` method, no adaptation and no model export."""
    export_folder: Path | None = None
    """Also file every image under ``export_folder/<predicted class>/`` (``sinks.export_folder``)."""
    export_mode: str = "hardlink"
    """hardlink (a copy where impossible), symlink or copy."""
    min_confidence: float | None = None
    """Predictions below this confidence are exported to ``_uncertain/``."""
    export_bn: str = "stream"
    """BatchNorm running statistics of the exported model where the run normalised with test-batch
    statistics: ``stream`` (an EMA over the stream's, see ``sinks.stream_bn``) or ``source``."""
    format: str = "csv"
    """predictions.csv or predictions.jsonl."""
    checkpoint_every: int = 50
    """Batches between resume checkpoints in ``OUT/checkpoint.pt`` (0: none; see ``tta_cli.checkpoint``)."""

    def out_dir(self) -> Path:
        if self.out is not None:
            return self.out
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{stamp}-{self.method}"

    def to_record(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()} | {
            "inputs": [str(p) for p in self.inputs]
        }
