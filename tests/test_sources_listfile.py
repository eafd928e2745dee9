"""List files: explicit order from .txt and .csv, labels, and the errors a list can hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.errors import TTAError
from tta_cli.sources.listfile import list_items

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    make_images(tmp_path / "imgs", 4)
    return tmp_path


def test_txt_gives_the_listed_order(images: Path) -> None:
    lst = images / "order.txt"
    lst.write_text("# a comment\nimgs/img3.png\n\n  imgs/img0.png  \nimgs/img3.png\n")
    items = list_items(lst, CLASSES)
    assert [i.key for i in items] == ["imgs/img3.png", "imgs/img0.png", "imgs/img3.png"]
    assert items[0].path == images / "imgs/img3.png" and items[0].label is None


def test_absolute_paths_are_kept(images: Path, tmp_path: Path) -> None:
    lst = tmp_path / "elsewhere" / "list.txt"
    lst.parent.mkdir()
    lst.write_text(f"{images / 'imgs/img1.png'}\n")
    assert list_items(lst, CLASSES)[0].path == images / "imgs/img1.png"


def test_csv_with_header_reads_file_and_label_columns(images: Path) -> None:
    lst = images / "list.csv"
    lst.write_text("id,label,file\n1,dog,imgs/img2.png\n2,2,imgs/img1.png\n3,,imgs/img0.png\n")
    items = list_items(lst, CLASSES)
    assert [(i.key, i.label) for i in items] == [
        ("imgs/img2.png", 1), ("imgs/img1.png", 2), ("imgs/img0.png", None)]


def test_csv_without_header_is_file_then_label(images: Path) -> None:
    lst = images / "list.csv"
    lst.write_text("imgs/img1.png,Cat\n\nimgs/img0.png\n")
    items = list_items(lst, CLASSES)
    assert [(i.key, i.label) for i in items] == [("imgs/img1.png", 0), ("imgs/img0.png", None)]


def test_missing_entries_are_an_input_error(images: Path) -> None:
    lst = images / "list.txt"
    lst.write_text("imgs/img0.png\nimgs/nope.png\nimgs\n")
    with pytest.raises(TTAError, match=r"2 of 3 entries .*line 2, imgs/nope.png does not exist") as err:
        list_items(lst, CLASSES)
    assert "relative to the list's folder" in str(err.value)


def test_unknown_label_names_the_line(images: Path) -> None:
    lst = images / "list.csv"
    lst.write_text("file,label\nimgs/img0.png,zebra\n")
    with pytest.raises(TTAError, match="line 2"):
        list_items(lst, CLASSES)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "lists no files"),
    (b"# only a comment\n", "lists no files"),
    (b"\xff\xfe\x00garbage\x9c", "line 1 is not valid utf-8"),
])
def test_bad_lists(tmp_path: Path, content: bytes, message: str) -> None:
    lst = tmp_path / "list.txt"
    lst.write_bytes(content)
    with pytest.raises(TTAError, match=message):
        list_items(lst, CLASSES)


def test_csv_row_without_file(tmp_path: Path) -> None:
    lst = tmp_path / "list.csv"
    lst.write_text("file,label\n,cat\n")
    with pytest.raises(TTAError, match="line 2 has no file"):
        list_items(lst, CLASSES)


def test_paths_are_normalised(images: Path) -> None:
    lst = images / "list.txt"
    lst.write_text("./imgs/img1.png\nimgs//img0.png\n")
    items = list_items(lst, CLASSES)
    assert [i.key for i in items] == ["imgs/img1.png", "imgs/img0.png"]
    assert items[0].path == images / "imgs/img1.png"


def test_conflicting_duplicate_labels_name_both_lines(images: Path) -> None:
    lst = images / "list.csv"
    lst.write_text("file,label\nimgs/img0.png,cat\nimgs/img1.png,dog\n./imgs/img0.png,0\n")
    assert [i.label for i in list_items(lst, CLASSES)] == [0, 1, 0]  # a repeat that agrees is fine
    lst.write_text("file,label\nimgs/img0.png,cat\nimgs/img1.png,dog\n./imgs/img0.png,bird\n")
    with pytest.raises(TTAError) as err:
        list_items(lst, CLASSES)
    assert "imgs/img0.png two labels: 'cat' on line 2 and 'bird' on line 4" in err.value.message


def test_a_list_in_another_encoding(images: Path) -> None:
    lst = images / "list.csv"
    lst.write_bytes("file,label\nimgs/img0.png,ch\u00e2teau\n".encode("cp1252"))
    classes = ["ch\u00e2teau"]
    with pytest.raises(TTAError, match=r"line 2 is not valid utf-8 \(byte 0xe2\)") as err:
        list_items(lst, classes)
    assert "--labels-encoding" in (err.value.hint or "")
    assert list_items(lst, classes, encoding="cp1252")[0].label == 0
