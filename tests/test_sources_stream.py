"""Whole streams: several inputs in order, keys, kinds of input, shuffling (sources/__init__, stream)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.errors import TTAError
from tta_cli.sources import ImagePart, Stream, StreamItem, VideoPart, collect_stream
from tta_cli.sources.stream import merge_parts
from tta_cli.sources.video import VideoInfo, VideoOptions

CLASSES = ["cat", "dog"]


@pytest.fixture
def two_folders(tmp_path: Path) -> tuple[Path, Path]:
    make_images(tmp_path / "a", 3)
    make_images(tmp_path / "b", 2, prefix="x")
    return tmp_path / "a", tmp_path / "b"


def keys(stream: Stream) -> list[str]:
    return [item.key for part in stream.parts if isinstance(part, ImagePart) for item in part.items]


def test_one_folder_keeps_relative_keys(two_folders: tuple[Path, Path]) -> None:
    assert keys(collect_stream([two_folders[0]], CLASSES)) == ["img0.png", "img1.png", "img2.png"]


def test_several_inputs_are_concatenated_in_order(two_folders: tuple[Path, Path]) -> None:
    a, b = two_folders
    stream = collect_stream([b, a, b / "x1.png"], CLASSES)
    assert len(stream.parts) == 1 and stream.total == 6
    assert keys(stream) == [f"{b.as_posix()}/x0.png", f"{b.as_posix()}/x1.png", f"{a.as_posix()}/img0.png",
                            f"{a.as_posix()}/img1.png", f"{a.as_posix()}/img2.png", (b / "x1.png").as_posix()]
    assert stream.describe() == "6 images, labels: none"


def test_a_single_image_is_an_input(two_folders: tuple[Path, Path]) -> None:
    assert keys(collect_stream([two_folders[0] / "img1.png"], CLASSES)) == ["img1.png"]


def test_list_input(two_folders: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("file,label\nb/x1.png,dog\na/img0.png,cat\n")
    stream = collect_stream([tmp_path / "l.csv"], CLASSES)
    assert [(i.key, i.label) for i in stream.parts[0].items] == [("b/x1.png", 1), ("a/img0.png", 0)]


def test_shuffle_is_a_seeded_permutation_of_everything(two_folders: tuple[Path, Path]) -> None:
    inputs = list(two_folders)
    plain = keys(collect_stream(inputs, CLASSES))
    first = collect_stream(inputs, CLASSES, shuffle=True, seed=1)
    assert first.shuffled and first.describe() == "5 images, shuffled, labels: none"
    assert keys(first) == keys(collect_stream(inputs, CLASSES, shuffle=True, seed=1))
    assert sorted(keys(first)) == sorted(plain)
    orders = {tuple(keys(collect_stream(inputs, CLASSES, shuffle=True, seed=s))) for s in range(6)}
    assert len(orders) > 1


@pytest.mark.parametrize(("name", "message"), [
    ("notes.doc", "unknown kind of file"),
    ("missing", "input not found"),
])
def test_bad_inputs(tmp_path: Path, name: str, message: str) -> None:
    if name != "missing":
        (tmp_path / name).write_text("x")
    with pytest.raises(TTAError, match=message):
        collect_stream([tmp_path / name], CLASSES)


def test_no_inputs() -> None:
    with pytest.raises(TTAError, match="no inputs"):
        collect_stream([], CLASSES)


def test_video_options_are_checked_first(two_folders: tuple[Path, Path]) -> None:
    with pytest.raises(TTAError, match="--every"):
        collect_stream([two_folders[0]], CLASSES, video=VideoOptions(every=0))


def test_merge_joins_adjacent_image_parts_only() -> None:
    item = StreamItem("k", Path("k.png"))
    video = VideoPart(Path("v.mp4"), "v.mp4", VideoOptions(), VideoInfo(None, None, None, 1, 1))
    merged = merge_parts([ImagePart([item]), ImagePart([item]), video, ImagePart([item])])
    assert [type(p).__name__ for p in merged] == ["ImagePart", "VideoPart", "ImagePart"]
    assert len(merged[0].items) == 2
    assert Stream(merged).total is None  # a video of unknown length
