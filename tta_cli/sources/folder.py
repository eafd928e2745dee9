"""Image folders: walked recursively, streamed in natural order, labelled by subfolder or CSV."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem
from tta_cli.sources.labels import LabelMap
from tta_cli.sources.paths import check_input

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``img2`` before ``img10`` (digit runs compare as numbers)."""
    parts = _DIGITS.split(text)
    return tuple((0, int(part)) if part.isdigit() else (1, part.casefold()) for part in parts if part)


def _path_key(relative: str) -> tuple[tuple[tuple[int, int | str], ...], ...]:
    return tuple(natural_key(part) for part in relative.split("/"))


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the images under ``root``, in natural order, symlink loops avoided."""
    found: list[str] = []
    seen_dirs: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=_raise_walk_error):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # a symlink loop: do not descend twice
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        base = Path(dirpath).relative_to(root)
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                found.append((base / name).as_posix())
    return sorted(found, key=_path_key)


def _raise_walk_error(err: OSError) -> None:
    raise TTAError(f"cannot read {err.filename}: {err.strerror}", "check the folder's permissions")


def _labels_from_csv(path: Path, labels: LabelMap) -> dict[str, int]:
    if not path.is_file():
        raise TTAError(f"labels file not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "file" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise TTAError(f"{path} needs the columns 'file' and 'label'", f"found {reader.fieldnames}")
        return {row["file"].strip(): labels.index(row["label"], path.name) for row in reader}


def _labels_from_subfolders(relative: list[str], labels: LabelMap) -> dict[str, int] | None:
    """Labels from first-level subfolders, when every image sits in one named like a class."""
    mapping: dict[str, int] = {}
    for rel in relative:
        top, sep, _ = rel.partition("/")
        if not sep:
            return None
        index = labels.lookup(top)
        if index is None:
            return None
        mapping[rel] = index
    return mapping


def folder_items(root: Path, class_names: list[str], labels_csv: Path | None = None) -> list[StreamItem]:
    """The images under ``root`` as stream items, labelled where labels are available."""
    check_input(root)
    if not root.is_dir():
        raise TTAError(f"{root} is not a folder of images")
    relative = list_images(root)
    if not relative:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise TTAError(f"no images in {root}", f"looked for {suffixes} in it and its subfolders; "
                       "give videos and lists as inputs themselves")
    label_map = LabelMap(class_names)
    if labels_csv is not None:
        by_file = _labels_from_csv(labels_csv, label_map)
        labels: dict[str, int] | None = {
            rel: by_file[rel] if rel in by_file else by_file.get(Path(rel).name, -1) for rel in relative
        }
        missing = [rel for rel, label in labels.items() if label < 0]
        if missing:
            raise TTAError(
                f"{len(missing)} images have no row in {labels_csv} (e.g. {missing[0]})",
                "the 'file' column holds paths relative to the input folder, or file names",
            )
    else:
        labels = _labels_from_subfolders(relative, label_map)
    return [StreamItem(key=rel, path=root / rel, label=None if labels is None else labels[rel])
            for rel in relative]
