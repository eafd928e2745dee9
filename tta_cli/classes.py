"""A model's classes: readable names (``pred_name``) with their ids (``pred_id``) alongside.

A class has an index (the classifier output), an id (timm's ``label_names``: a WordNet id such as
``n01440764`` for ImageNet, or whatever the model folder names it) and a readable name (timm's
``label_descriptions``, or ImageNet's lemma: ``tench, Tinca tinca``). Where a model has no
descriptions the name is the id; where it has no ids either, both are the index.

``ClassNames`` is the list of readable names, so that everything that takes a list of class names
keeps working, and carries the ids so that labels may be given as index, id or name.
"""

from __future__ import annotations

from collections.abc import Iterable


class ClassNames(list[str]):
    """Readable class names in classifier order, with ``ids`` (same order, same length)."""

    def __init__(self, names: Iterable[str], ids: Iterable[str] | None = None) -> None:
        super().__init__(str(n) for n in names)
        self.ids: list[str] = list(self) if ids is None else [str(i) for i in ids]
        if len(self.ids) != len(self):
            raise ValueError(f"{len(self)} class names but {len(self.ids)} class ids")

    def descriptions(self) -> dict[str, str]:
        """id -> readable name, where the two differ (timm's ``label_descriptions``)."""
        return {i: n for i, n in zip(self.ids, self, strict=True) if i != n}


def class_ids_of(names: list[str]) -> list[str]:
    """The ids behind a list of class names (the names themselves for a plain list)."""
    return names.ids if isinstance(names, ClassNames) else list(names)
