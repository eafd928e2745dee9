"""The sorted export: class folders safe everywhere, every image once, links, frames, manifest."""

from __future__ import annotations

import csv
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from tta_cli.classes import ClassNames
from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs
from tta_cli.sinks import export_folder as ef
from tta_cli.sinks.export_folder import ExportFolder, class_folders, plan_overwrite, safe_name
from tta_cli.sources.items import Batch, StreamItem

from .conftest import make_images


def outputs(items: list[StreamItem], preds: list[int], confidence: list[float] | None = None,
            first: int = 0) -> BatchOutputs:
    n = len(items)
    conf = torch.tensor(confidence if confidence is not None else [0.9] * n)
    return BatchOutputs(
        batch=Batch(items, torch.zeros(n, 3, 2, 2), first), pred=torch.tensor(preds), confidence=conf,
        entropy=torch.zeros(n), top5=torch.tensor(preds).view(n, 1), used=torch.ones(n, dtype=torch.bool),
        filtered=(), reset=False, seconds=0.0,
    )


def manifest(directory: Path) -> list[dict[str, str]]:
    with (directory / "manifest.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(("name", "safe"), [
    ("cat", "cat"),
    ("tench, Tinca tinca", "tench, Tinca tinca"),
    ("a/b\\c", "a_b_c"),
    ("..", "_"),
    (".", "_"),
    (".hidden", "_hidden"),
    ("../../etc", "_._.._etc"),
    ("CON", "_CON"),
    ("nul.txt", "_nul.txt"),
    ("com7", "_com7"),
    ("COM10", "COM10"),
    ("lpt1 ", "_lpt1"),
    ("trailing. . ", "trailing"),
    ("tab\there\nnl", "tab here nl"),
    ("bell\x07\x00", "bell__"),
    ('what?<>:"|*', "what_______"),
    ("zero\u200bwidth", "zero_width"),
    ("", "_"),
])
def test_safe_name(name: str, safe: str) -> None:
    assert safe_name(name) == safe


def test_safe_name_caps_length_at_a_character_boundary() -> None:
    long = "é" * 200  # 2 bytes each
    capped = safe_name(long)
    assert len(capped.encode("utf-8")) <= ef.MAX_NAME_BYTES and capped == "é" * (ef.MAX_NAME_BYTES // 2)


def test_class_folders_resolve_collisions_deterministically() -> None:
    names = ["crane", "Crane", "a/b", "a_b", "_uncertain", "manifest.csv", "crane-0", "", "crane"]
    folders = class_folders(names)
    assert folders == ["crane", "Crane-1", "a_b", "a_b-3", "_uncertain-4", "manifest.csv-5", "crane-0",
                       "class_7", "crane-8"]
    assert len({f.casefold() for f in folders}) == len(folders)
    assert class_folders(names) == folders


def test_every_image_once_under_its_class_with_manifest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    paths = make_images(src / "a", 3) + make_images(src / "b", 2)  # b/img0.png collides with a/
    items = [StreamItem(str(p.relative_to(src)), p) for p in paths]
    sink = ExportFolder(tmp_path / "out", ClassNames(["cat", "dog"], ["c", "d"]))
    sink.on_batch(outputs(items[:3], [0, 1, 0]))
    sink.on_batch(outputs(items[3:], [0, 0], first=3))
    sink.close()
    rows = manifest(tmp_path / "out")
    assert [r["key"] for r in rows] == [i.key for i in items]
    assert sorted(p.name for p in (tmp_path / "out" / "cat").iterdir()) == [
        "img0-2.png", "img0.png", "img1.png", "img2.png"]  # b/img1.png is the first img1 here
    assert [p.name for p in (tmp_path / "out" / "dog").iterdir()] == ["img1.png"]
    for row in rows:
        exported = tmp_path / "out" / row["file"]
        assert exported.read_bytes() == Path(row["source"]).read_bytes()
        assert os.path.samefile(exported, row["source"]) and row["how"] == "hardlink"
        assert row["pred_name"] == ("cat" if row["pred"] == "0" else "dog")
    assert sink.stats.files == 5 and not sink.failed
    with (tmp_path / "out" / "classes.csv").open() as f:
        assert list(csv.reader(f))[1:] == [["0", "c", "cat", "cat", "0"], ["1", "d", "dog", "dog", "0"]]


def test_min_confidence_sends_the_rest_to_uncertain(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "src", 3)
    items = [StreamItem(p.name, p) for p in paths]
    sink = ExportFolder(tmp_path / "out", ["cat", "dog"], min_confidence=0.5)
    sink.on_batch(outputs(items, [0, 1, 1], [0.49, 0.5, 0.9]))
    sink.close()
    rows = manifest(tmp_path / "out")
    assert [r["file"] for r in rows] == ["_uncertain/img0.png", "dog/img1.png", "dog/img2.png"]
    assert [r["uncertain"] for r in rows] == ["1", "0", "0"] and rows[0]["pred_name"] == "cat"
    assert sink.stats.uncertain == 1


@pytest.mark.parametrize("mode", ["copy", "symlink"])
def test_copy_and_symlink_modes(mode: str, tmp_path: Path) -> None:
    paths = make_images(tmp_path / "src", 2)
    sink = ExportFolder(tmp_path / "out", ["x"], mode=mode)
    sink.on_batch(outputs([StreamItem(p.name, p) for p in paths], [0, 0]))
    sink.close()
    for row, path in zip(manifest(tmp_path / "out"), paths, strict=True):
        exported = tmp_path / "out" / row["file"]
        assert row["how"] == mode and exported.read_bytes() == path.read_bytes()
        assert exported.is_symlink() == (mode == "symlink")
        assert (exported.stat().st_ino == path.stat().st_ino) == (mode == "symlink")


def test_hardlink_falls_back_to_copy_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(ef.os, "link", cross_device)
    paths = make_images(tmp_path / "src", 2)
    sink = ExportFolder(tmp_path / "out", ["x"])
    sink.on_batch(outputs([StreamItem(p.name, p) for p in paths], [0, 0]))
    sink.close()
    assert [r["how"] for r in manifest(tmp_path / "out")] == ["copy", "copy"]
    assert sink.stats.copied_instead_of_linked == 2


def test_other_link_errors_are_recorded_not_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ef.os, "link", no_space)
    path = make_images(tmp_path / "src", 1)[0]
    sink = ExportFolder(tmp_path / "out", ["x"])
    sink.on_batch(outputs([StreamItem(path.name, path)], [0]))
    sink.close()
    assert manifest(tmp_path / "out") == [] and sink.failed[0][0] == "img0.png"
    assert "No space" in sink.failed[0][1]


def test_video_frames_are_written_as_png(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not read: the frame reader is a stand-in")
    calls: list[str] = []

    def frames(path: Path, key: str) -> Iterator[tuple[int, Image.Image]]:
        calls.append(key)
        for n in range(10):
            yield n, Image.new("RGB", (8, 6), (20 * n, 0, 0))

    items = [StreamItem(f"clip.mp4#frame={n:06d}", video, frame=n) for n in (0, 3, 7)]
    sink = ExportFolder(tmp_path / "out", ["a", "b"], frame_reader=frames)
    sink.on_batch(outputs(items[:2], [0, 1]))
    sink.on_batch(outputs(items[2:], [0], first=2))
    sink.on_batch(outputs([items[0]], [1], first=3))  # an earlier frame again: decoding starts over
    sink.close()
    rows = manifest(tmp_path / "out")
    assert [r["file"] for r in rows] == ["a/clip_frame000000.png", "b/clip_frame000003.png",
                                         "a/clip_frame000007.png", "b/clip_frame000000.png"]
    assert [r["how"] for r in rows] == ["written"] * 4 and rows[1]["frame"] == "3"
    with Image.open(tmp_path / "out" / "a" / "clip_frame000007.png") as image:
        assert image.size == (8, 6) and image.getpixel((0, 0)) == (140, 0, 0)
    assert calls == ["clip.mp4", "clip.mp4"]


def test_real_video_frames(tmp_path: Path) -> None:
    from tests.helpers import write_video

    video = write_video(tmp_path / "v.mp4", n=6)
    items = [StreamItem(f"v.mp4#frame={n:06d}", video, frame=n) for n in (1, 4)]
    sink = ExportFolder(tmp_path / "out", ["a"])
    sink.on_batch(outputs(items, [0, 0]))
    sink.close()
    with Image.open(tmp_path / "out" / "a" / "v_frame000004.png") as image:
        assert image.size == (64, 48) and abs(image.getpixel((5, 5))[0] - 32) <= 3  # frame 4 is level 32


def test_refuses_a_non_empty_folder_and_overwrites_only_an_earlier_export(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "src", 2)
    items = [StreamItem(p.name, p) for p in paths]
    first = ExportFolder(tmp_path / "out", ["x", "y"])
    first.on_batch(outputs(items, [0, 1]))
    first.close()
    with pytest.raises(TTAError, match="not empty"):
        ExportFolder(tmp_path / "out", ["x", "y"])
    again = ExportFolder(tmp_path / "out", ["x", "y"], overwrite=True)
    again.on_batch(outputs(items, [1, 1]))
    again.close()
    assert not (tmp_path / "out" / "x").exists()
    assert sorted(p.name for p in (tmp_path / "out" / "y").iterdir()) == ["img0.png", "img1.png"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(TTAError, match="not from an earlier export"):
        ExportFolder(tmp_path / "mine", ["x"], overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_bad_options() -> None:
    with pytest.raises(TTAError, match="export-mode"):
        ExportFolder(Path("unused"), ["x"], mode="move")
    with pytest.raises(TTAError, match="min-confidence"):
        ExportFolder(Path("unused"), ["x"], min_confidence=1.5)


def test_overwrite_never_deletes_through_a_symlinked_class_folder(tmp_path: Path) -> None:
    """Issue #24.1: a stale manifest naming a file behind a linked class folder outside the export."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "p.txt").write_text("x")
    export = tmp_path / "export"
    export.mkdir()
    (export / "cat").symlink_to(outside)
    (export / "manifest.csv").write_text("file\ncat/p.txt\n")
    with pytest.raises(TTAError, match="not from an earlier export"):
        ExportFolder(export, ["cat"], overwrite=True)
    assert (outside / "p.txt").read_text() == "x"
    # the same when an earlier export listed "cat" as its own folder and it became a link later
    paths = make_images(tmp_path / "src", 1)
    shutil.rmtree(export)
    first = ExportFolder(export, ["cat"])
    first.on_batch(outputs([StreamItem(paths[0].name, paths[0])], [0]))
    first.close()
    shutil.rmtree(export / "cat")
    (export / "cat").symlink_to(outside)
    with (export / "manifest.csv").open("a") as f:
        f.write("cat/p.txt,,,,,,,,\n")
    with pytest.raises(TTAError, match="not from an earlier export"):
        ExportFolder(export, ["cat"], overwrite=True)
    assert (outside / "p.txt").read_text() == "x"


def test_plan_overwrite_checks_without_removing(tmp_path: Path) -> None:
    paths = make_images(tmp_path / "src", 2)
    sink = ExportFolder(tmp_path / "out", ["x", "y"])
    sink.on_batch(outputs([StreamItem(p.name, p) for p in paths], [0, 1]))
    sink.close()
    planned = plan_overwrite(tmp_path / "out", overwrite=True)
    assert {p.name for p in planned} == {"img0.png", "img1.png", "x", "y", "manifest.csv", "classes.csv"}
    assert (tmp_path / "out" / "x" / "img0.png").exists()
    (tmp_path / "out" / "y" / "mine.txt").write_text("keep")
    with pytest.raises(TTAError, match=r"mine\.txt"):
        plan_overwrite(tmp_path / "out", overwrite=True)


def test_a_name_that_is_not_utf8_is_exported_and_listed_in_utf8(tmp_path: Path) -> None:
    """Issue #24.11: UnicodeEncodeError (exit 1) in the manifest."""
    from tta_cli.sinks.predictions import original_bytes

    source = tmp_path / os.fsdecode(b"src/caf\xe9.png")
    make_images(source.parent, 1)
    (source.parent / "img0.png").rename(source)
    sink = ExportFolder(tmp_path / "out", ["x"])
    sink.on_batch(outputs([StreamItem(source.name, source)], [0]))
    sink.close()
    assert [p.name for p in (tmp_path / "out" / "x").iterdir()] == ["caf_xe9.png"]
    with (tmp_path / "out" / "manifest.csv").open(encoding="utf-8") as f:  # strict UTF-8
        row = next(csv.DictReader(f))
    assert row["file"] == "x/caf_xe9.png" and original_bytes(row["key"]) == b"caf\xe9.png"
