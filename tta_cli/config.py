"""The configuration of one ``tta adapt`` run (method hyperparameters live in each method's dataclass)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

MAX_IMAGE_PIXELS = 89_478_485  # PIL's default decompression-bomb limit


def default_workers() -> int:
    """Decoding workers: one per core beyond the one running the adaptation, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class AdaptConfig:
    inputs: list[Path]
    model: str
    method: str = "sar"
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
    precision: str = "fp32"
    """fp32, bf16 or fp16 (autocast; see docs/PERFORMANCE.md)."""
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
    max_pixels: int = MAX_IMAGE_PIXELS
    """Images with more pixels are skipped (decompression bombs); 0: no limit."""
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
