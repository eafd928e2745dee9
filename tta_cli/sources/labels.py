"""Mapping label text (a class name, a class id or an index) to the model's class index."""

from __future__ import annotations

from tta_cli.classes import class_ids_of
from tta_cli.errors import TTAError


class LabelMap:
    """Label strings to class indices: exact names or ids first, then case-insensitive, then indices."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = class_names
        both = list(enumerate(class_ids_of(class_names))) + list(enumerate(class_names))
        self._exact = {name: i for i, name in reversed(both)}  # ids win; of equal names the first
        self._folded = {name.casefold(): i for i, name in reversed(both)}

    def lookup(self, text: str) -> int | None:
        text = text.strip()
        if text in self._exact:
            return self._exact[text]
        if text.casefold() in self._folded:
            return self._folded[text.casefold()]
        if text.isdigit() and int(text) < len(self.class_names):
            return int(text)
        return None

    def index(self, text: str, where: str) -> int:
        found = self.lookup(text)
        if found is None:
            sample = ", ".join(self.class_names[:5])
            raise TTAError(
                f"label {text!r} in {where} is neither a class name nor a class index of the model",
                f"the model has {len(self.class_names)} classes: {sample}, ...",
            )
        return found
