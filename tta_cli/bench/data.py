"""Finding the labelled, corrupted images a benchmark runs on.

Two layouts are read: the ImageNet-C one that ``tta corrupt`` writes
(``<corruption>/<severity>/<class>/...``, or ``<corruption>/<class>/...`` with one severity), and a
flat stream with a ``labels.csv`` that has a ``corruption`` column (``tools/make_stream.py``,
``sample_data/stream``). Anything else is a clean set, which ``tta bench`` corrupts first.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path

from tta_cli.bench.corrupt import CLEAN, CORRUPTIONS, KNOWN
from tta_cli.errors import TTAError
from tta_cli.sources.folder import folder_items
from tta_cli.sources.items import StreamItem


@dataclass
class CorruptedSet:
    """Labelled images per corruption, each list in the folder's natural order."""

    root: Path
    layout: str
    by_corruption: dict[str, list[StreamItem]]

    @property
    def corruptions(self) -> list[str]:
        return list(self.by_corruption)


def _severity_folder(folder: Path, severity: int) -> Path:
    """``folder/<severity>`` when the corruption has severity subfolders, else ``folder`` itself."""
    levels = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not levels:
        return folder
    if str(severity) not in levels:
        raise TTAError(f"{folder} has no severity {severity}", f"it has {', '.join(levels)}; use --severity")
    return folder / str(severity)


def _labelled(items: list[StreamItem], where: Path) -> list[StreamItem]:
    if any(item.label is None for item in items):
        raise TTAError(f"the images in {where} have no labels",
                       "a benchmark needs class subfolders named like the model's classes (or indices)")
    return items


def _imagenet_c(root: Path, class_names: list[str], severity: int) -> dict[str, list[StreamItem]]:
    found: dict[str, list[StreamItem]] = {}
    for name in (*KNOWN, CLEAN):
        folder = root / name
        if folder.is_dir():
            items = folder_items(_severity_folder(folder, severity), class_names)
            found[name] = [replace(item, key=f"{name}/{item.key}") for item in _labelled(items, folder)]
    return found


def _labels_csv(root: Path, class_names: list[str]) -> dict[str, list[StreamItem]]:
    labels = root / "labels.csv"
    with labels.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "corruption" not in rows[0]:
        return {}
    corruption_of = {row["file"].strip(): row["corruption"].strip() for row in rows}
    found: dict[str, list[StreamItem]] = {}
    for item in folder_items(root, class_names, labels):
        name = corruption_of.get(item.key, corruption_of.get(Path(item.key).name, "unknown"))
        found.setdefault(name, []).append(item)
    return found


Found = dict[str, list[StreamItem]]


def _pick(found: Found, wanted: list[str] | None, root: Path) -> Found:
    """The requested corruptions in the requested order; by default the 15 test corruptions found
    (held-out and clean images are only used when named)."""
    if wanted is None:
        default = [c for c in CORRUPTIONS if c in found]
        wanted = default or list(found)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise TTAError(f"{root} has no images for {', '.join(missing)}",
                       f"it has {', '.join(found) or 'none'}; run `tta corrupt` for the others")
    return {c: found[c] for c in wanted}


def find_corrupted(root: Path, class_names: list[str], severity: int = 5,
                   corruptions: list[str] | None = None) -> CorruptedSet | None:
    """The corrupted set under ``root``, or None when ``root`` holds no corruption folders and no
    labels.csv with a corruption column (a clean set)."""
    if not root.is_dir():
        raise TTAError(f"data folder not found: {root}")
    found = _imagenet_c(root, class_names, severity)
    layout = "imagenet-c"
    if not found and (root / "labels.csv").is_file():
        found, layout = _labels_csv(root, class_names), "labels.csv"
    if not found:
        return None
    return CorruptedSet(root, layout, _pick(found, corruptions, root))


def limit_items(by_corruption: dict[str, list[StreamItem]], limit: int | None,
                seed: int) -> dict[str, list[StreamItem]]:
    """At most ``limit`` images per corruption: a seeded sample of positions, so corruptions
    written from the same clean images keep the same images."""
    if limit is None:
        return by_corruption
    if limit < 1:
        raise TTAError("--limit must be at least 1")
    out: dict[str, list[StreamItem]] = {}
    for name, items in by_corruption.items():
        if len(items) <= limit:
            out[name] = items
            continue
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        out[name] = [items[i] for i in keep]
    return out


SEVERITIES = (1, 2, 3, 4, 5)


def find_levels(root: Path, class_names: list[str], corruptions: list[str]) -> dict[int, dict[str, list[StreamItem]]]:
    """The images of every severity 1-5 of the given corruptions (the gradual setting), or a
    clear error naming the severity that is missing."""
    levels: dict[int, dict[str, list[StreamItem]]] = {}
    for severity in SEVERITIES:
        found = find_corrupted(root, class_names, severity, corruptions)
        if found is None:
            raise TTAError(f"{root} holds no corrupted images", "the gradual setting needs severities 1-5")
        levels[severity] = found.by_corruption
    return levels
