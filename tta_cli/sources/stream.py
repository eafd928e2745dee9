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
    labels_from: dict[str, str] = field(default_factory=dict)
    """Each input (as given) -> where its labels came from: ``labels-csv:PATH``, ``folder-names``,
    ``folder-index``, ``list-file`` or ``none`` (``tta_cli.sources.labels``)."""
    label_notes: list[str] = field(default_factory=list)
    """Why folders that could have given labels did not (for the console)."""

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
        return text + (", shuffled" if self.shuffled else "") + f", labels: {self.describe_labels()}"

    def describe_labels(self) -> str:
        """Where the labels came from, in words: one source for all inputs, else per input."""
        sources = set(self.labels_from.values())
        if len(sources) <= 1:
            text = _label_words(next(iter(sources), "none"))
        else:
            text = "; ".join(f"{name}: {_label_words(source)}" for name, source in self.labels_from.items())
        return text + (f" ({'; '.join(self.label_notes)})" if self.label_notes else "")

    def record(self) -> dict[str, object]:
        """What the run record keeps about the stream (labels' sources per input)."""
        return {"images": self.images, "videos": [str(v) for v in self.videos], "shuffled": self.shuffled,
                "labels_from": dict(self.labels_from), "label_notes": list(self.label_notes)}

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _label_words(source: str) -> str:
    kind, _, detail = source.partition(":")
    return {
        "labels-csv": f"from {detail}",
        "folder-names": "from sub-folder names",
        "folder-index": "from sub-folder names read as class indices",
        "list-file": "from the list's label column",
        "none": "none",
    }.get(kind, source)


def merge_parts(parts: list[Part]) -> list[Part]:
    """Adjacent image parts joined into one, so one worker pool decodes across input boundaries."""
    merged: list[Part] = []
    for part in parts:
        if isinstance(part, ImagePart) and merged and isinstance(merged[-1], ImagePart):
            merged[-1] = ImagePart(merged[-1].items + part.items)
        else:
            merged.append(part)
    return merged
