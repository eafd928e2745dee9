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
from tta_cli.sources.labels import LabelMap
from tta_cli.sources.paths import permission_error

LIST_SUFFIXES = frozenset({".txt", ".csv"})

Row = tuple[int, str, str | None]
"""Line number, path as written, label text (None when absent)."""


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except PermissionError:
        raise permission_error(path) from None
    except UnicodeDecodeError:
        raise TTAError(f"{path} is not a UTF-8 text file", "a list holds one path per line") from None
    except OSError as err:
        raise TTAError(f"cannot read {path}: {err.strerror}") from None


def _txt_rows(text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            rows.append((number, line, None))
    return rows


def _csv_rows(text: str, path: Path) -> list[Row]:
    lines = list(csv.reader(io.StringIO(text)))
    if not lines:
        return []
    header = [cell.strip().casefold() for cell in lines[0]]
    file_col, label_col, first = 0, 1, 0
    if "file" in header:  # a header row; without one, the columns are file[,label]
        file_col = header.index("file")
        label_col = header.index("label") if "label" in header else -1
        first = 1
    rows = []
    for number, cells in enumerate(lines[first:], first + 1):
        if not any(cell.strip() for cell in cells):
            continue
        file = cells[file_col].strip() if file_col < len(cells) else ""
        if not file:
            raise TTAError(f"{path} line {number} has no file",
                           "the first column (or the one headed 'file') names the image")
        label = cells[label_col].strip() if 0 <= label_col < len(cells) else ""
        rows.append((number, file, label or None))
    return rows


def list_items(path: Path, class_names: list[str]) -> list[StreamItem]:
    """The files listed in ``path``, in its order; every one must exist."""
    text = _read_text(path)
    rows = _csv_rows(text, path) if path.suffix.lower() == ".csv" else _txt_rows(text)
    if not rows:
        raise TTAError(f"{path} lists no files", "a .txt holds one path per line, a .csv file[,label] rows")
    labels = LabelMap(class_names)
    items, missing = [], []
    for number, file, label in rows:
        target = Path(file).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not target.is_file():
            missing.append((number, file, target))
        index = None if label is None else labels.index(label, f"{path} line {number}")
        items.append(StreamItem(key=file, path=target, label=index))
    if missing:
        number, file, target = missing[0]
        what = "does not exist" if not target.exists() else "is not a file"
        raise TTAError(
            f"{len(missing)} of {len(rows)} entries of {path} cannot be used: line {number}, {file} {what}",
            f"paths are relative to the list's folder ({path.parent}) or absolute, and name files",
        )
    return items
