"""List files: an explicit stream order, as a ``.txt`` (one path per line) or ``.csv`` (``file[,label]``).

Paths are relative to the list file's folder (or absolute). In a ``.txt``, blank lines and lines
starting with ``#`` are ignored. A ``.csv`` has a header naming the columns ``file`` and optionally
``label`` (others are ignored), or no header, when the columns are file and label, in that order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem
from tta_cli.sources.labels import (
    DEFAULT_ENCODING,
    LabelMap,
    LabelRow,
    check_duplicates,
    normalise_key,
    read_label_text,
)

LIST_SUFFIXES = frozenset({".txt", ".csv"})

Row = tuple[int, str, str | None]
"""Line number, path as written, label text (None when absent)."""


def _txt_rows(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append((number, line, None))
    return rows


def _csv_rows(text: str, path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    lines = [(reader.line_num, cells) for cells in reader]
    if not lines:
        return []
    header = [cell.strip().casefold() for cell in lines[0][1]]
    file_col, label_col, first = 0, 1, 0
    if "file" in header:  # a header row; without one, the columns are file[,label]
        file_col = header.index("file")
        label_col = header.index("label") if "label" in header else -1
        first = 1
    rows = []
    for number, cells in lines[first:]:
        if not any(cell.strip() for cell in cells):
            continue
        file = cells[file_col].strip() if file_col < len(cells) else ""
        if not file:
            raise TTAError(f"{path} line {number} has no file",
                           "the first column (or the one headed 'file') names the image")
        label = cells[label_col].strip() if 0 <= label_col < len(cells) else ""
        rows.append((number, file, label or None))
    return rows


def list_items(path: Path, class_names: list[str], encoding: str = DEFAULT_ENCODING) -> list[StreamItem]:
    """The files listed in ``path``, in its order; every one must exist.

    Paths are normalised (``./a.jpg`` is ``a.jpg``); a file listed twice with different labels is
    an error naming both lines.
    """
    text = read_label_text(path, encoding, "list")
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _txt_rows(text)
    if not rows:
        raise TTAError(f"{path} lists no files", "a .txt holds one path per line, a .csv file[,label] rows")
    labels = LabelMap(class_names)
    items: list[StreamItem] = []
    missing: list[tuple[int, str, Path]] = []
    labelled: list[LabelRow] = []
    for number, file, label in rows:
        key = normalise_key(file)
        target = Path(key).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            missing.append((number, file, target))
        index = None if label is None else labels.index(label, f"{path} line {number}")
        if index is not None:
            labelled.append((number, key, label, index))
        items.append(StreamItem(key=key, path=target, label=index))
    check_duplicates(labelled, path)
    if missing:
        number, file, target = missing[0]
        what = "does not exist" if not target.exists() else "is not a file"
        raise TTAError(
            f"{len(missing)} of {len(rows)} entries of {path} cannot be used: line {number}, {file} {what}",
            f"paths are relative to the list's folder ({path.parent}) or absolute, and name files",
        )
    return items
