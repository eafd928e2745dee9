"""The test streams of each setting (the SAR paper's wild settings plus the mild one).

* ``mild``: per corruption, its images shuffled, batch size B (64).
* ``bs1``: the same shuffled streams, batch size 1 (optionally only their first N images).
* ``label-shift``: per corruption, class by class (class order shuffled by the seed, the same for
  every corruption), never shuffled within a class; batch size B.
* ``mixed``: all corruptions in one shuffled stream, batch size B (one run).
* ``label-shift-all``: all corruptions pooled, class by class (within a class: corruption by
  corruption), batch size B (one run). This is the label-shift stream of a set with one image per
  class, such as the ImageNet sample, where a per-corruption class order is no shift at all.

Every shuffle is seeded from the seed and the stream's name only, so a stream is identical across
methods, models and runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem

SETTINGS: dict[str, str] = {
    "mild": "per corruption, shuffled, batch size B",
    "bs1": "per corruption, shuffled, batch size 1",
    "label-shift": "per corruption, class by class, batch size B",
    "mixed": "all corruptions in one shuffled stream, batch size B",
    "label-shift-all": "all corruptions pooled, class by class, batch size B",
}
POOLED = "all"
"""The corruption name of a stream that pools every corruption."""


@dataclass
class BenchStream:
    """One test stream of a benchmark setting: labelled items in order, fed at one batch size."""

    setting: str
    corruption: str
    items: list[StreamItem]
    batch_size: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.corruption}"


def parse_settings(text: str | Sequence[str]) -> list[str]:
    """Comma-separated (or repeated) setting names, validated, order kept."""
    parts = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in parts:
        for name in (p.strip().lower().replace("_", "-") for p in part.split(",")):
            if name in ("label", "labelshift"):
                name = "label-shift"
            if not name:
                continue
            if name not in SETTINGS:
                raise TTAError(f"unknown setting {name!r}", f"choose from {', '.join(SETTINGS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise TTAError("no setting given", f"choose from {', '.join(SETTINGS)}")
    return names


def shuffled(items: Sequence[StreamItem], seed: int, name: str) -> list[StreamItem]:
    out = list(items)
    random.Random(f"{seed}/{name}").shuffle(out)
    return out


def class_order(items: Sequence[StreamItem], seed: int) -> list[int]:
    """The labels present, in an order shuffled by the seed alone (shared by all corruptions)."""
    labels = sorted({int(item.label) for item in items if item.label is not None})
    random.Random(f"{seed}/classes").shuffle(labels)
    return labels


def class_by_class(items: Sequence[StreamItem], order: list[int]) -> list[StreamItem]:
    """All images of the first class, then the next...; within a class the given order is kept."""
    rank = {label: i for i, label in enumerate(order)}
    # sorted() is stable: within a class the items keep their order (trap 5: never shuffled).
    return sorted(items, key=lambda item: rank[int(item.label)])  # type: ignore[arg-type]


def _per_corruption(setting: str, by_corruption: dict[str, list[StreamItem]], batch_size: int, seed: int,
                    bs1_limit: int | None, order: list[int]) -> list[BenchStream]:
    streams = []
    for corruption, items in by_corruption.items():
        if setting == "label-shift":
            streams.append(BenchStream(setting, corruption, class_by_class(items, order), batch_size))
            continue
        # mild and bs1 share one shuffle per corruption: bs1 differs only in its batch size.
        stream = shuffled(items, seed, corruption)
        if setting == "bs1":
            streams.append(BenchStream(setting, corruption, stream[:bs1_limit] if bs1_limit else stream, 1))
        else:
            streams.append(BenchStream(setting, corruption, stream, batch_size))
    return streams


def build_streams(by_corruption: dict[str, list[StreamItem]], settings: Sequence[str], batch_size: int = 64,
                  seed: int = 0, bs1_limit: int | None = None) -> list[BenchStream]:
    """Every stream of the requested settings, settings in the given order."""
    if batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    pooled = [item for items in by_corruption.values() for item in items]
    order = class_order(pooled, seed)
    streams: list[BenchStream] = []
    for setting in settings:
        if setting == "mixed":
            streams.append(BenchStream(setting, POOLED, shuffled(pooled, seed, "mixed"), batch_size))
        elif setting == "label-shift-all":
            streams.append(BenchStream(setting, POOLED, class_by_class(pooled, order), batch_size))
        else:
            streams += _per_corruption(setting, by_corruption, batch_size, seed, bs1_limit, order)
    return streams
