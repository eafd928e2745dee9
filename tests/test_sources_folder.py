"""Image folders: natural order, labels from subfolders or a CSV, links and empty folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.errors import TTAError
from tta_cli.sources.folder import folder_items, natural_key

CLASSES = ["cat", "dog"]


def test_natural_order(tmp_path: Path) -> None:
    make_images(tmp_path, 12)
    keys = [i.key for i in folder_items(tmp_path, CLASSES)]
    assert keys[:3] + keys[-2:] == ["img0.png", "img1.png", "img2.png", "img10.png", "img11.png"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_labels_from_class_subfolders(tmp_path: Path) -> None:
    make_images(tmp_path / "dog", 2)
    make_images(tmp_path / "Cat", 1)
    assert [(i.key, i.label) for i in folder_items(tmp_path, CLASSES)] == [
        ("Cat/img0.png", 0), ("dog/img0.png", 1), ("dog/img1.png", 1)]


def test_labels_from_csv(tmp_path: Path) -> None:
    make_images(tmp_path / "x", 2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nimg0.png,dog\nimg1.png,0\n")
    assert [i.label for i in folder_items(tmp_path / "x", CLASSES, labels)] == [1, 0]


def test_hidden_files_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    make_images(tmp_path, 1)
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert [i.key for i in folder_items(tmp_path, CLASSES)] == ["img0.png"]


def test_folder_symlink_loop_is_walked_once(tmp_path: Path) -> None:
    make_images(tmp_path / "d", 2)
    (tmp_path / "d" / "again").symlink_to(tmp_path / "d")
    assert [i.key for i in folder_items(tmp_path / "d", CLASSES)] == ["img0.png", "img1.png"]


def test_empty_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(TTAError, match="no images in") as err:
        folder_items(tmp_path, CLASSES)
    assert "videos and lists as inputs" in str(err.value)


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(TTAError, match="input not found"):
        folder_items(tmp_path / "nope", CLASSES)
