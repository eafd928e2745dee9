"""The test streams of each setting (the SAR paper's wild settings plus the mild one).

* ``mild``: per corruption, its images shuffled, batch size B (64).
* ``bs1``: the same shuffled streams, batch size 1 (optionally only their first N images).
* ``label-shift``: per corruption, class by class (class order shuffled by the seed, the same for
  every corruption), never shuffled within a class; batch size B.
* ``mixed``: all corruptions in one shuffled stream, batch size B (one run).
* ``label-shift-all``: all corruptions pooled, class by class (within a class: corruption by
  corruption), batch size B (one run). This is the label-shift stream of a set with one image per
  class, such as the ImageNet sample, where a per-corruption class order is no shift at all.
* ``continual``: the corruptions one after another in one stream, without a reset (the CoTTA
  protocol; also ROID's and MD's "continual"): each corruption's part is its mild stream.
* ``correlated``: per corruption, labels correlated over time by Dirichlet sampling (below).
* ``mixed-correlated``: all corruptions pooled, the labels correlated over time the same way.
* ``gradual``: one continual stream; each corruption goes through severities 1, 2, 3, 4, 5, 4, 3,
  2, 1 (CoTTA's gradual protocol). The corruption's shuffled images are cut into 9 equal parts, one
  per level, so each image appears once, at one severity, and the stream is as long as continual's.

Correlated labels (NOTE, Gong et al. 2022; used by RoTTA and the universal-TTA benchmarks): time is
cut into T slots (T = the number of classes); each class c draws its share of every slot,
p_c ~ Dirichlet(gamma * 1_T), and its images (shuffled) are cut in that proportion into the slots;
the slots are played in order, and within a slot the class blocks come in a random order. A small
concentration gamma puts each class in few slots (long single-class runs: 0.01 is close to
label-shift), a large one spreads every class over all slots (close to mild, up to the short blocks
of one class per slot). The default gamma is 0.1 (NOTE's and RoTTA's delta).

Every shuffle and draw is seeded from the seed and the stream's name only, so a stream is identical
across methods, models and runs. ``setting_parameters`` records what defines each setting; it
goes into ``bench.json`` with every stream.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem

SETTINGS: dict[str, str] = {
    "mild": "per corruption, shuffled, batch size B",
    "bs1": "per corruption, shuffled, batch size 1",
    "label-shift": "per corruption, class by class, batch size B",
    "mixed": "all corruptions in one shuffled stream, batch size B",
    "label-shift-all": "all corruptions pooled, class by class, batch size B",
    "continual": "the corruptions one after another in one stream, no reset, batch size B",
    "correlated": "per corruption, labels correlated over time (Dirichlet), batch size B",
    "mixed-correlated": "all corruptions pooled, labels correlated over time (Dirichlet), batch size B",
    "gradual": "one stream, each corruption at severity 1 -> 5 -> 1, no reset, batch size B",
}
DIRICHLET_CONCENTRATION = 0.1
"""gamma of the correlated settings (NOTE's and RoTTA's value)."""
GRADUAL_LEVELS: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)
POOLED = "all"
"""The corruption name of a stream that pools every corruption."""


@dataclass
class BenchStream:
    """One test stream of a benchmark setting: labelled items in order, fed at one batch size."""

    setting: str
    corruption: str
    items: list[StreamItem]
    batch_size: int
    params: dict[str, Any] = field(default_factory=dict)
    """What defines the stream beyond its name (recorded in bench.json)."""

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


def setting_parameters(setting: str, seed: int, batch_size: int, concentration: float = DIRICHLET_CONCENTRATION,
                       bs1_limit: int | None = None) -> dict[str, Any]:
    """Everything that defines a setting's streams, for the record."""
    params: dict[str, Any] = {"description": SETTINGS[setting], "seed": seed,
                              "batch_size": 1 if setting == "bs1" else batch_size}
    if setting in ("correlated", "mixed-correlated"):
        params |= {"concentration": concentration, "slots": "number of classes",
                   "algorithm": "NOTE's Dirichlet label sampling"}
    if setting == "gradual":
        params["levels"] = list(GRADUAL_LEVELS)
    if setting == "bs1" and bs1_limit:
        params["bs1_limit"] = bs1_limit
    return params


def _generator(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def dirichlet_order(items: Sequence[StreamItem], concentration: float, seed: int, name: str,
                    slots: int | None = None) -> list[StreamItem]:
    """The items with labels correlated over time (NOTE's sampling, see the module docstring)."""
    if concentration <= 0:
        raise TTAError(f"the Dirichlet concentration must be positive, got {concentration}")
    rng = _generator(seed, name)
    labels = sorted({int(item.label) for item in items if item.label is not None})
    n_slots = slots or len(labels)
    by_class = {label: [item for item in items if item.label == label] for label in labels}
    shares = rng.dirichlet([concentration] * n_slots, size=len(labels))
    slot_blocks: list[list[list[StreamItem]]] = [[] for _ in range(n_slots)]
    for label, share in zip(labels, shares, strict=True):
        members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        cuts = (np.cumsum(share)[:-1] * len(members)).astype(int)
        for slot, block in enumerate(np.split(np.arange(len(members)), cuts)):
            if len(block):
                slot_blocks[slot].append([members[i] for i in block])
    order: list[StreamItem] = []
    for blocks in slot_blocks:
        for i in rng.permutation(len(blocks)):
            order.extend(blocks[i])
    return order


def gradual_stream(by_severity: dict[int, dict[str, list[StreamItem]]], corruptions: Sequence[str],
                   seed: int) -> list[StreamItem]:
    """Per corruption, its shuffled images cut into one part per level of ``GRADUAL_LEVELS``, each
    part at its level's severity; the corruptions one after another."""
    missing = sorted(set(GRADUAL_LEVELS) - set(by_severity))
    if missing:
        raise TTAError(f"the gradual setting needs severities 1-5; missing {', '.join(map(str, missing))}",
                       "corrupt the data at --severity 1-5 (tta corrupt -s 1-5)")
    stream: list[StreamItem] = []
    for corruption in corruptions:
        at = {level: {_relative(item.key): item for item in by_severity[level][corruption]}
              for level in set(GRADUAL_LEVELS)}
        keys = [_relative(item.key) for item in shuffled(by_severity[5][corruption], seed, corruption)]
        parts = np.array_split(np.arange(len(keys)), len(GRADUAL_LEVELS))
        for level, part in zip(GRADUAL_LEVELS, parts, strict=True):
            for i in part:
                item = at[level][keys[i]]
                stream.append(replace(item, key=f"{corruption}/{level}/{keys[i]}"))
    return stream


def _relative(key: str) -> str:
    """The image's path below its corruption (and severity) folder: the same at every severity."""
    return key.split("/", 1)[1] if "/" in key else key


def _per_corruption(setting: str, by_corruption: dict[str, list[StreamItem]], batch_size: int, seed: int,
                    bs1_limit: int | None, order: list[int], concentration: float) -> list[BenchStream]:
    streams = []
    for corruption, items in by_corruption.items():
        if setting == "label-shift":
            streams.append(BenchStream(setting, corruption, class_by_class(items, order), batch_size))
            continue
        if setting == "correlated":
            streams.append(BenchStream(setting, corruption,
                                  dirichlet_order(items, concentration, seed, f"correlated/{corruption}"),
                                  batch_size))
            continue
        # mild and bs1 share one shuffle per corruption: bs1 differs only in its batch size.
        stream = shuffled(items, seed, corruption)
        if setting == "bs1":
            streams.append(BenchStream(setting, corruption, stream[:bs1_limit] if bs1_limit else stream, 1))
        else:
            streams.append(BenchStream(setting, corruption, stream, batch_size))
    return streams


def build_streams(by_corruption: dict[str, list[StreamItem]], settings: Sequence[str], batch_size: int = 64,
                  seed: int = 0, bs1_limit: int | None = None, concentration: float = DIRICHLET_CONCENTRATION,
                  by_severity: dict[int, dict[str, list[StreamItem]]] | None = None) -> list[BenchStream]:
    """Every stream of the requested settings, settings in the given order. ``by_severity`` (the
    images at each severity 1-5) is needed by ``gradual`` only."""
    if batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    pooled = [item for items in by_corruption.values() for item in items]
    order = class_order(pooled, seed)
    streams: list[BenchStream] = []
    for setting in settings:
        params = setting_parameters(setting, seed, batch_size, concentration, bs1_limit)
        if setting == "mixed":
            made = [BenchStream(setting, POOLED, shuffled(pooled, seed, "mixed"), batch_size)]
        elif setting == "label-shift-all":
            made = [BenchStream(setting, POOLED, class_by_class(pooled, order), batch_size)]
        elif setting == "continual":
            made = [BenchStream(setting, POOLED, [item for corruption, items in by_corruption.items()
                                             for item in shuffled(items, seed, corruption)], batch_size)]
        elif setting == "mixed-correlated":
            made = [BenchStream(setting, POOLED, dirichlet_order(pooled, concentration, seed, "mixed-correlated"),
                           batch_size)]
        elif setting == "gradual":
            made = [BenchStream(setting, POOLED, gradual_stream(by_severity or {}, list(by_corruption), seed),
                           batch_size)]
        else:
            made = _per_corruption(setting, by_corruption, batch_size, seed, bs1_limit, order, concentration)
        for stream in made:
            stream.params = params | ({"order": list(by_corruption)} if stream.corruption == POOLED else {})
        streams += made
    return streams
