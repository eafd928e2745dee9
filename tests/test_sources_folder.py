"""Image folders: natural order, labels from subfolders or a CSV, links and empty folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.errors import TTAError
from tta_cli.sources.folder import folder_items, labelled_folder, natural_key
from tta_cli.sources.labels import FROM_FOLDER_INDEX, FROM_FOLDER_NAMES, NO_LABELS

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


def _camera_folders(root: Path) -> None:
    make_images(root / "1", 2)
    make_images(root / "2", 2, seed=1)


def test_numbered_sub_folders_are_not_labels_by_default(tmp_path: Path) -> None:
    """Camera or session ids (1/, 2/) are not class indices unless asked."""
    _camera_folders(tmp_path)
    found = labelled_folder(tmp_path, CLASSES)
    assert [i.label for i in found.items] == [None] * 4 and found.labels_from == NO_LABELS
    assert found.note is not None and "1, 2 are not class names" in found.note
    assert "--labels-from-folders index" in found.note


def test_numbered_sub_folders_as_class_indices_when_asked(tmp_path: Path) -> None:
    _camera_folders(tmp_path)
    found = labelled_folder(tmp_path, [*CLASSES, "bird"], from_folders="index")
    assert [i.label for i in found.items] == [1, 1, 2, 2] and found.labels_from == FROM_FOLDER_INDEX


def test_index_mode_refuses_folders_beyond_the_classes(tmp_path: Path) -> None:
    _camera_folders(tmp_path)  # 2/ is beyond the two classes
    with pytest.raises(TTAError, match=r"sub-folders 2 are not class indices"):
        labelled_folder(tmp_path, CLASSES, from_folders="index")


def test_names_mode_refuses_what_auto_lets_pass(tmp_path: Path) -> None:
    make_images(tmp_path / "cat", 1)
    make_images(tmp_path / "zebra", 1)
    assert labelled_folder(tmp_path, CLASSES).labels_from == NO_LABELS
    with pytest.raises(TTAError, match=r"sub-folders zebra are not class names") as err:
        labelled_folder(tmp_path, CLASSES, from_folders="names")
    assert "cat, dog" in (err.value.hint or "")


def test_folder_labels_off_and_names(tmp_path: Path) -> None:
    make_images(tmp_path / "Dog", 1)
    make_images(tmp_path / "cat", 1)
    assert [i.label for i in labelled_folder(tmp_path, CLASSES, from_folders="off").items] == [None, None]
    found = labelled_folder(tmp_path, CLASSES, from_folders="names")
    assert [i.label for i in found.items] == [0, 1] and found.labels_from == FROM_FOLDER_NAMES


def test_labels_csv_paths_are_normalised(tmp_path: Path) -> None:
    make_images(tmp_path / "x" / "sub", 2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n./sub/img0.png,dog\nsub//img1.png,cat\n")
    found = labelled_folder(tmp_path / "x", CLASSES, labels)
    assert [(i.key, i.label) for i in found.items] == [("sub/img0.png", 1), ("sub/img1.png", 0)]
    assert found.labels_from == f"labels-csv:{labels}"


def test_labels_csv_duplicates_must_agree(tmp_path: Path) -> None:
    make_images(tmp_path / "x", 2)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nimg0.png,dog\nimg1.png,cat\n./img0.png,1\n")  # 1 is dog: agrees
    assert [i.label for i in folder_items(tmp_path / "x", CLASSES, labels)] == [1, 0]
    labels.write_text("file,label\nimg0.png,dog\nimg1.png,cat\n./img0.png,cat\n")
    with pytest.raises(TTAError) as err:
        folder_items(tmp_path / "x", CLASSES, labels)
    assert "img0.png two labels: 'dog' on line 2 and 'cat' on line 4" in err.value.message


def test_labels_csv_in_latin_1(tmp_path: Path) -> None:
    make_images(tmp_path / "x", 2)
    labels = tmp_path / "labels.csv"
    labels.write_bytes("file,label\nimg0.png,caf\u00e9\nimg1.png,th\u00e9\n".encode("latin-1"))
    classes = ["caf\u00e9", "th\u00e9"]
    with pytest.raises(TTAError) as err:
        folder_items(tmp_path / "x", classes, labels)
    assert f"{labels} line 2 is not valid utf-8 (byte 0xe9)" == err.value.message
    assert "--labels-encoding" in (err.value.hint or "")
    assert [i.label for i in folder_items(tmp_path / "x", classes, labels, labels_encoding="latin-1")] == [0, 1]


def test_labels_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    make_images(tmp_path / "x", 1)
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"\xef\xbb\xbffile,label\nimg0.png,dog\n")
    assert [i.label for i in folder_items(tmp_path / "x", CLASSES, labels, labels_encoding="utf-8")] == [1]


def test_labels_csv_and_folder_labels_together_are_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "x", 1)
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,dog\n")
    with pytest.raises(TTAError, match="both give labels"):
        folder_items(tmp_path / "x", CLASSES, tmp_path / "labels.csv", from_folders="index")


def test_file_names_that_are_not_utf8_are_kept_exactly(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    try:
        make_images(tmp_path, 1, prefix="ok")
        os.rename(os.fsencode(tmp_path / "ok0.png"), raw)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    (item,) = folder_items(tmp_path, CLASSES)
    assert os.fsencode(item.path) == raw and item.key == os.fsdecode(b"caf\xe9.png")
