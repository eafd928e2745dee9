"""``--export-folder DIR``: every image of the stream filed under ``DIR/<predicted class>/``.

Images are hard-linked (default; copied where a hard link is impossible, e.g. across file
systems), symlinked or copied; video frames are written as PNG files. Predictions below
``--min-confidence`` go to ``DIR/_uncertain/``. ``DIR/manifest.csv`` maps every exported file to its
source, predicted class and confidence, a row per file as soon as the file exists (an interrupted
run leaves a manifest that matches the folder; names that are not UTF-8 are written as in
``predictions.csv``, backslash x and two hex digits); ``DIR/classes.csv`` gives every class's folder.

Class folders are named so that the export can be copied to any file system: no path separators,
no control or Windows-forbidden characters, no reserved Windows names (CON, NUL, COM1, ...), no
trailing dots or spaces, at most ``MAX_NAME_BYTES`` bytes. Two classes whose safe names coincide
(case-insensitively, as on Windows and macOS; ImageNet has two classes named "crane") are told apart
by appending the class index to every one but the first, and ``classes.csv`` records the result.
"""

from __future__ import annotations

import csv
import errno
import os
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from PIL import Image

from tta_cli.choices import EXPORT_MODES
from tta_cli.classes import class_ids_of
from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs
from tta_cli.ownership import content, owned, record, refuse_link, remove_path, start_manifest
from tta_cli.sinks.predictions import csv_text, utf8_text
from tta_cli.sources.items import StreamItem

ExportMode = Literal["hardlink", "symlink", "copy"]
UNCERTAIN = "_uncertain"
MANIFEST = "manifest.csv"
CLASSES = "classes.csv"
MANIFEST_COLUMNS = ["file", "source", "key", "frame", "pred", "pred_name", "confidence", "uncertain", "how"]
MAX_NAME_BYTES = 120
"""Well under the 255-byte name limit of common file systems, leaving room for a suffix."""

_FORBIDDEN = set('/\\<>:"|?*')
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
# Errors of os.link that mean "no hard link here", not "cannot write": copy instead.
_NO_HARDLINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES}

FrameReader = Callable[[Path, str], Iterator[tuple[int, Image.Image]]]
"""(video path, key) -> (frame number, RGB image) for every frame in decoding order."""


def safe_name(name: str, fallback: str = "_") -> str:
    """``name`` as a file or folder name that every common file system accepts."""
    # bytes that are not UTF-8 as backslash escapes (the backslash becomes "_"); tabs, newlines,
    # runs of spaces: one space
    text = " ".join(unicodedata.normalize("NFC", utf8_text(name)).split())
    text = "".join("_" if ch in _FORBIDDEN or unicodedata.category(ch) in ("Cc", "Cf") else ch for ch in text)
    text = _cap_bytes(text, MAX_NAME_BYTES).rstrip(". ")
    if text.startswith("."):  # hidden folders, "." and ".."
        text = "_" + text[1:]
    if text.split(".")[0].rstrip(" ").upper() in _RESERVED:
        text = "_" + text
    return text or fallback


def _cap_bytes(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")


def class_folders(class_names: list[str]) -> list[str]:
    """A distinct safe folder name per class (in class order, so the result is deterministic)."""
    taken = {UNCERTAIN.casefold(), MANIFEST.casefold(), CLASSES.casefold()}
    folders = []
    for index, name in enumerate(class_names):
        folder = safe_name(name, fallback=f"class_{index}")
        if folder.casefold() in taken:
            base = _cap_bytes(folder, MAX_NAME_BYTES - 12).rstrip(". ")
            folder, n = f"{base}-{index}", 2
            while folder.casefold() in taken:
                folder, n = f"{base}-{index}-{n}", n + 1
        taken.add(folder.casefold())
        folders.append(folder)
    return folders


def read_video_frames(path: Path, key: str) -> Iterator[tuple[int, Image.Image]]:
    """Every frame of a video with its number, as the stream numbers them (one sequential pass)."""
    from tta_cli.sources.video import VideoOptions, iter_frames

    for item, image, _reason in iter_frames(path, key, VideoOptions()):
        if image is not None and item.frame is not None:
            yield item.frame, image


class _FrameCursor:
    """One video, decoded forward on demand: frames are asked for in stream order, so exporting
    them costs one more sequential decode of the video; asking for an earlier frame starts over."""

    def __init__(self, path: Path, key: str, reader: FrameReader) -> None:
        self.path, self.key, self.reader = path, key, reader
        self._frames: Iterator[tuple[int, Image.Image]] | None = None
        self._last = -1

    def frame(self, number: int) -> Image.Image | None:
        if self._frames is None or number <= self._last:
            self.close()
            self._frames = self.reader(self.path, self.key)
        for index, image in self._frames:
            self._last = index
            if index == number:
                return image
            if index > number:
                break
        return None

    def close(self) -> None:
        if self._frames is not None and hasattr(self._frames, "close"):
            self._frames.close()  # type: ignore[union-attr]
        self._frames, self._last = None, -1


@dataclass
class ExportStats:
    files: int = 0
    uncertain: int = 0
    copied_instead_of_linked: int = 0


class ExportFolder:
    """A sink: files each batch's images into ``directory`` by predicted class."""

    def __init__(self, directory: Path, class_names: list[str], mode: str = "hardlink",
                 min_confidence: float | None = None, overwrite: bool = False,
                 frame_reader: FrameReader = read_video_frames) -> None:
        if mode not in EXPORT_MODES:
            raise TTAError(f"unknown --export-mode {mode!r}", f"choose from {', '.join(EXPORT_MODES)}")
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise TTAError(f"--min-confidence must be between 0 and 1, got {min_confidence}")
        self.directory, self.mode, self.min_confidence = directory, mode, min_confidence
        self.class_names = class_names
        self.folders = class_folders(class_names)
        self.frame_reader = frame_reader
        self.stats = ExportStats()
        self.failed: list[tuple[str, str]] = []
        """(stream key, reason) for the images that could not be exported."""
        self._taken: dict[str, set[str]] = {}
        self._made: set[str] = set()
        self._videos: dict[Path, _FrameCursor] = {}
        _prepare(directory, overwrite)
        record(directory, CLASSES, MANIFEST)
        self._write_classes(class_ids_of(class_names))
        self._file: IO[str] = (directory / MANIFEST).open("w", newline="", encoding="utf-8")
        self._manifest = csv.writer(self._file)
        self._manifest.writerow(MANIFEST_COLUMNS)

    def _write_classes(self, ids: list[str]) -> None:
        with (self.directory / CLASSES).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["pred", "pred_id", "pred_name", "folder", "renamed"])
            for index, (name, folder) in enumerate(zip(self.class_names, self.folders, strict=True)):
                writer.writerow([index, ids[index], name, folder, int(folder != name)])

    def on_batch(self, out: BatchOutputs) -> None:
        for i, item in enumerate(out.batch.items):
            pred, confidence = int(out.pred[i]), float(out.confidence[i])
            uncertain = self.min_confidence is not None and confidence < self.min_confidence
            folder = UNCERTAIN if uncertain else self._folder(pred)
            try:
                relative, how = self._export(item, folder)
            except OSError as err:
                self.failed.append((item.key, f"{type(err).__name__}: {err.strerror or err}"))
                continue
            name = self.class_names[pred] if pred < len(self.class_names) else str(pred)
            self._manifest.writerow([relative, csv_text(str(item.path.resolve())), csv_text(item.key),
                                     "" if item.frame is None else item.frame, pred, name,
                                     f"{confidence:.6f}", int(uncertain), how])
            self.stats.files += 1
            self.stats.uncertain += int(uncertain)
        self._file.flush()

    def _folder(self, pred: int) -> str:
        return self.folders[pred] if pred < len(self.folders) else safe_name(f"class_{pred}")

    def _export(self, item: StreamItem, folder: str) -> tuple[str, str]:
        """Write one item under ``folder``; (its path relative to the export, how it was written)."""
        target_dir = self._class_dir(folder)
        if item.frame is not None:
            name = self._unique(folder, f"{safe_name(item.path.stem)}_frame{item.frame:06d}.png")
            image = self._video(item).frame(item.frame)
            if image is None:
                raise OSError(errno.ENOENT, f"frame {item.frame} not found in {item.path}")
            image.save(target_dir / name, format="PNG")
            return f"{folder}/{name}", "written"
        name = self._unique(folder, safe_name(item.path.name, fallback="image"))
        how = self._place(item.path, target_dir / name)
        return f"{folder}/{name}", how

    def _class_dir(self, folder: str) -> Path:
        """The class folder, created by this export (listed as its own first; never a link)."""
        target_dir = self.directory / folder
        if folder not in self._made:
            record(self.directory, folder)
            refuse_link(target_dir, "export class folder")
            target_dir.mkdir(exist_ok=True)
            self._made.add(folder)
        return target_dir

    def _unique(self, folder: str, name: str) -> str:
        """``name``, or ``stem-2.ext``, ``stem-3.ext``, ... if the folder already holds it (any case)."""
        taken = self._taken.setdefault(folder, set())
        stem, dot, suffix = name.rpartition(".")
        if not dot or not stem:
            stem, suffix = name, ""
        candidate, n = name, 2
        while candidate.casefold() in taken:
            candidate, n = f"{stem}-{n}{'.' + suffix if suffix else ''}", n + 1
        taken.add(candidate.casefold())
        return candidate

    def _place(self, source: Path, target: Path) -> str:
        if self.mode == "symlink":
            os.symlink(source.resolve(), target)
            return "symlink"
        if self.mode == "hardlink":
            try:
                os.link(source, target)
                return "hardlink"
            except OSError as err:
                if err.errno not in _NO_HARDLINK:
                    raise
                self.stats.copied_instead_of_linked += 1
        shutil.copy2(source, target)
        return "copy"

    def _video(self, item: StreamItem) -> _FrameCursor:
        cursor = self._videos.get(item.path)
        if cursor is None:
            cursor = self._videos[item.path] = _FrameCursor(item.path, item.key.split("#frame=")[0],
                                                            self.frame_reader)
        return cursor

    def close(self) -> None:
        for cursor in self._videos.values():
            cursor.close()
        self._videos.clear()
        self._file.close()


def _prepare(directory: Path, overwrite: bool) -> None:
    """An empty folder to export into; with ``overwrite``, an earlier export there is removed first
    (see :func:`plan_overwrite`)."""
    planned = plan_overwrite(directory, overwrite)
    for path in planned:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()  # an emptied class folder
        else:
            remove_path(path)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        start_manifest(directory)
    except OSError as err:
        raise TTAError(f"cannot create export folder {directory}: {err.strerror}") from err


def plan_overwrite(directory: Path, overwrite: bool) -> list[Path]:
    """Check ``directory`` and return what ``overwrite`` removes there, files first (nothing is
    removed here). Only an earlier export is removed: the files its ``manifest.csv`` lists, in the
    class folders that export created (``.tta-outputs.json``, :mod:`tta_cli.ownership`), never
    through a link; then those folders, emptied. Anything else there refuses the export."""
    refuse_link(directory, "--export-folder")
    if directory.exists() and not directory.is_dir():
        raise TTAError(f"export path {directory} exists and is not a folder")
    present = content(directory)
    if not present:
        return []
    if not overwrite:
        raise TTAError(f"export folder {directory} is not empty", "choose another --export-folder or pass --overwrite")
    names = owned(directory)
    files = set(_listed_files(directory, names))
    planned: list[Path] = sorted(files)
    folders, foreign = [], []
    for entry in present:
        if entry.name in (MANIFEST, CLASSES) and entry.name in names and not entry.is_symlink():
            planned.append(entry)
        elif entry.name in names and entry.is_dir() and not entry.is_symlink():
            rest = [p for p in sorted(entry.iterdir()) if p not in files]
            if rest:
                foreign.append(rest[0])
            else:
                folders.append(entry)
        else:
            foreign.append(entry)
    if foreign:
        raise TTAError(f"export folder {directory} holds files that are not from an earlier export "
                       f"(e.g. {foreign[0]}): tta deletes only files it wrote", "choose another --export-folder")
    return planned + folders


def _listed_files(directory: Path, names: set[str]) -> list[Path]:
    """The files an earlier export's manifest lists, each in a class folder it created."""
    manifest = directory / MANIFEST
    if MANIFEST not in names or manifest.is_symlink() or not manifest.is_file():
        return []
    listed = []
    with manifest.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
        for row in csv.DictReader(f):
            parts = (row.get("file") or "").split("/")
            if len(parts) != 2 or parts[0] not in names or parts[1] in ("", ".", ".."):
                continue
            folder = directory / parts[0]
            if folder.is_symlink() or not folder.is_dir():
                continue
            target = folder / parts[1]
            if target.is_symlink() or target.exists():
                listed.append(target)
    return listed
