"""The unit of a stream: one image (or one video frame), and a batch of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class StreamItem:
    """One image of the stream. ``key`` is what ``predictions.csv`` shows (a path relative to the
    input, or ``clip.mp4#frame=000123``); ``path`` is the file to read."""

    key: str
    path: Path
    label: int | None = None
    frame: int | None = None
    timestamp: float | None = None


@dataclass
class Batch:
    """Decoded, preprocessed images of consecutive stream items, in stream order."""

    items: list[StreamItem]
    images: torch.Tensor
    first_index: int
    """Position of ``items[0]`` among the decoded images of the stream."""
    skipped: list[tuple[StreamItem, str]] = field(default_factory=list)
    """Items before this batch's last one that could not be read, with the reason."""

    @property
    def labels(self) -> torch.Tensor | None:
        if any(item.label is None for item in self.items):
            return None
        return torch.tensor([item.label for item in self.items])
