"""A whole stream: the inputs in order, as runs of image items and videos decoded frame by frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tta_cli.sources.items import StreamItem
from tta_cli.sources.video import FrameCache, VideoInfo, VideoOptions


@dataclass
class ImagePart:
    """Items decoded independently (by a pool of workers): images, or frames from a cache."""

    items: list[StreamItem]


@dataclass
class VideoPart:
    """One video, decoded in a single pass; its frames are only known once decoded."""

    path: Path
    key: str
    """What the frames' keys start with (``clip.mp4`` gives ``clip.mp4#frame=000123``)."""
    options: VideoOptions
    info: VideoInfo
    label: int | None = None

    @property
    def estimate(self) -> int | None:
        return self.info.estimate(self.options)


Part = ImagePart | VideoPart


@dataclass
class Stream:
    parts: list[Part]
    cache: FrameCache | None = None
    """The frames of shuffled videos (the items of such a stream are all in one ImagePart)."""
    shuffled: bool = False
    videos: list[Path] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(len(p.items) for p in self.parts if isinstance(p, ImagePart))

    @property
    def total(self) -> int | None:
        """Items in the stream; videos count their estimated frames, None where that is unknown."""
        total = self.images
        for part in self.parts:
            if isinstance(part, VideoPart):
                if part.estimate is None:
                    return None
                total += part.estimate
        return total

    def describe(self) -> str:
        if not self.videos:
            text = f"{self.images} images"
        elif self.cache is not None:
            text = f"{self.images} images and frames ({len(self.videos)} videos)"
        else:
            frames = sum(p.estimate or 0 for p in self.parts if isinstance(p, VideoPart))
            text = f"{self.images} images and ~{frames} frames of {len(self.videos)} videos"
        return text + (", shuffled" if self.shuffled else "")

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def merge_parts(parts: list[Part]) -> list[Part]:
    """Adjacent image parts joined into one, so one worker pool decodes across input boundaries."""
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, ImagePart) and merged and isinstance(merged[-1], ImagePart):
            merged[-1] = ImagePart(merged[-1].items + part.items)
        else:
            merged.append(part)
    return merged
