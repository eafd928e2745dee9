"""Labels: label text (a class name or an index) to the model's class index, label files read in a
given encoding, file keys normalised so ``./a.jpg`` and ``a//b.jpg`` match, and where labels came from."""

from __future__ import annotations

import codecs
from pathlib import Path

from tta_cli.classes import class_ids_of
from tta_cli.errors import TTAError
from tta_cli.sources.paths import permission_error

DEFAULT_ENCODING = "utf-8"
"""Read with a byte-order mark (as spreadsheet programs write one) skipped."""

# Where the labels of an input came from (the run record shows them per input).
FROM_CSV = "labels-csv"
FROM_FOLDER_NAMES = "folder-names"
FROM_FOLDER_INDEX = "folder-index"
FROM_LIST = "list-file"
NO_LABELS = "none"


class LabelMap:
    """Label strings to class indices: exact names or ids first, then case-insensitive, then indices."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        both = list(enumerate(class_ids_of(class_names))) + list(enumerate(class_names))
        self._exact = {name: i for i, name in reversed(both)}  # ids win; of equal names the first
        self._folded = {name.casefold(): i for i, name in reversed(both)}

    def by_name(self, text: str) -> int | None:
        """The class named ``text`` (exactly, else case-insensitively); never an index."""
        text = text.strip()
        if text in self._exact:
            return self._exact[text]
        return self._folded.get(text.casefold())

    def by_index(self, text: str) -> int | None:
        """``text`` read as a class index (digits only, below the number of classes)."""
        text = text.strip()
        if text.isascii() and text.isdigit() and int(text) < len(self.class_names):
            return int(text)
        return None

    def lookup(self, text: str) -> int | None:
        found = self.by_name(text)
        return found if found is not None else self.by_index(text)

    def index(self, text: str, where: str) -> int:
        found = self.lookup(text)
        if found is None:
            raise TTAError(
                f"label {text!r} in {where} is neither a class name nor a class index of the model",
                f"the model has {len(self.class_names)} classes: {self.sample()}",
            )
        return found

    def sample(self) -> str:
        names = ", ".join(self.class_names[:5])
        return names + (", ..." if len(self.class_names) > 5 else "")


def normalise_key(text: str) -> str:
    """A path as the stream writes it: ``./a.jpg`` -> ``a.jpg``, ``a//b.jpg`` -> ``a/b.jpg``.

    ``..`` is kept (folding ``a/../b`` to ``b`` is wrong where ``a`` is a symbolic link); an
    absolute path stays absolute.
    """
    text = text.strip()
    parts = [part for part in text.split("/") if part not in ("", ".")]
    joined = "/".join(parts)
    return "/" + joined if text.startswith("/") else joined or text


def read_label_text(path: Path, encoding: str = DEFAULT_ENCODING, what: str = "labels file") -> str:
    """The text of a labels CSV or a list; a decoding error names the file, the line and the option."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TTAError(f"{what} not found: {path}") from None
    except PermissionError:
        raise permission_error(path) from None
    except IsADirectoryError:
        raise TTAError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise TTAError(f"cannot read {path}: {err.strerror}") from None
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise TTAError(f"unknown encoding {encoding!r}", "e.g. utf-8, latin-1, cp1252") from None
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as err:
        text = err.object  # without the byte-order mark, which utf-8-sig has removed
        line = text[:err.start].count(b"\n") + 1
        raise TTAError(
            f"{path} line {line} is not valid {codec} (byte 0x{text[err.start]:02x})",
            "give its encoding with --labels-encoding (e.g. latin-1 or cp1252), or save it as UTF-8",
        ) from None


LabelRow = tuple[int, str, str, int]
"""Line number, normalised file key, label text, class index."""


def check_duplicates(rows: list[LabelRow], path: Path) -> None:
    """Rows naming the same file with different classes are an error; agreeing repeats are fine."""
    first: dict[str, LabelRow] = {}
    for row in rows:
        number, key, text, index = row
        seen = first.setdefault(key, row)
        if seen[3] != index:
            raise TTAError(
                f"{path} gives {key} two labels: {seen[2]!r} on line {seen[0]} and {text!r} on line {number}",
                "keep one row per file (or make the rows agree)",
            )
