"""The benchmark's streams per setting, and finding the corrupted images they are made of."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.bench.data import find_corrupted, limit_items
from tta_cli.bench.settings import POOLED, build_streams, parse_settings
from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem

CORRUPTIONS = ["gaussian_noise", "fog", "contrast"]
CLASSES = [f"c{i}" for i in range(10)]


def _items(per_class: int = 3) -> dict[str, list[StreamItem]]:
    """Three corruptions of the same 10 x per_class images, in natural (class) order."""
    return {c: [StreamItem(f"{c}/c{k}/{i}.png", Path(f"{c}/c{k}/{i}.png"), k)
                for k in range(10) for i in range(per_class)]
            for c in CORRUPTIONS}


def _runs(labels: list[int]) -> list[int]:
    """The sequence of classes as visited (consecutive duplicates merged)."""
    return [label for i, label in enumerate(labels) if i == 0 or labels[i - 1] != label]


def test_parse_settings() -> None:
    assert parse_settings("mild, bs1,label_shift,mixed") == ["mild", "bs1", "label-shift", "mixed"]
    assert parse_settings(["label-shift-all", "mild", "mild"]) == ["label-shift-all", "mild"]
    with pytest.raises(TTAError, match="unknown setting"):
        parse_settings("wild")


def test_mild_is_shuffled_by_the_seed_and_bs1_is_the_same_stream() -> None:
    data = _items()
    streams = build_streams(data, ["mild", "bs1"], batch_size=8, seed=0, bs1_limit=5)
    mild = [s for s in streams if s.setting == "mild"]
    bs1 = [s for s in streams if s.setting == "bs1"]
    assert [s.corruption for s in mild] == CORRUPTIONS and all(s.batch_size == 8 for s in mild)
    for stream in mild:
        assert sorted(i.key for i in stream.items) == sorted(i.key for i in data[stream.corruption])
        assert [i.key for i in stream.items] != [i.key for i in data[stream.corruption]]
    assert all(s.batch_size == 1 and len(s.items) == 5 for s in bs1)
    assert bs1[0].items == mild[0].items[:5]
    again = build_streams(data, ["mild"], batch_size=8, seed=0)
    other = build_streams(data, ["mild"], batch_size=8, seed=1)
    assert [s.items for s in again] == [s.items for s in mild]
    assert [s.items for s in other] != [s.items for s in mild]


def test_label_shift_visits_classes_one_after_another_never_shuffled_within() -> None:
    data = _items()
    streams = build_streams(data, ["label-shift"], seed=0)
    orders = []
    for stream in streams:
        labels = [int(i.label) for i in stream.items]
        visits = _runs(labels)
        assert sorted(visits) == list(range(10))  # each class is one contiguous block
        orders.append(visits)
        for k in range(10):  # within a class: the folder's order
            assert [i.key for i in stream.items if i.label == k] == [i.key for i in data[stream.corruption]
                                                                   if i.label == k]
    assert orders[0] == orders[1] == orders[2] != list(range(10))  # one seeded class order for all
    assert _runs([int(i.label) for i in build_streams(data, ["label-shift"], seed=5)[0].items]) != orders[0]


def test_mixed_pools_and_shuffles_every_corruption() -> None:
    data = _items()
    (mixed,) = build_streams(data, ["mixed"], batch_size=16, seed=0)
    assert mixed.corruption == POOLED and mixed.batch_size == 16
    assert len(mixed.items) == 90
    first = [i.key.split("/")[0] for i in mixed.items[:20]]
    assert len(set(first)) == 3  # the corruptions are interleaved, not one after another


def test_label_shift_all_pools_corruptions_class_by_class() -> None:
    (stream,) = build_streams(_items(per_class=1), ["label-shift-all"], seed=0)
    labels = [int(i.label) for i in stream.items]
    assert sorted(_runs(labels)) == list(range(10)) and len(labels) == 30
    block = [i.key.split("/")[0] for i in stream.items[:3]]
    assert block == CORRUPTIONS  # within a class: corruption by corruption


def _corrupted_tree(root: Path, severities: tuple[int, ...] = (5,)) -> None:
    for corruption in ("fog", "snow", "spatter"):
        for severity in severities:
            for k in ("cat", "dog"):
                make_images(root / corruption / str(severity) / k, 3)


def test_find_imagenet_c_layout(tmp_path: Path) -> None:
    _corrupted_tree(tmp_path, (3, 5))
    found = find_corrupted(tmp_path, ["cat", "dog"], severity=3)
    assert found is not None and found.layout == "imagenet-c"
    assert found.corruptions == ["snow", "fog"]  # test corruptions only, in ImageNet-C order
    assert found.by_corruption["fog"][0].key == "fog/cat/img0.png"
    assert {i.label for i in found.by_corruption["fog"]} == {0, 1}
    named = find_corrupted(tmp_path, ["cat", "dog"], severity=5, corruptions=["spatter", "fog"])
    assert named is not None and named.corruptions == ["spatter", "fog"]
    with pytest.raises(TTAError, match="no severity 4"):
        find_corrupted(tmp_path, ["cat", "dog"], severity=4)
    with pytest.raises(TTAError, match="no images for zoom_blur"):
        find_corrupted(tmp_path, ["cat", "dog"], corruptions=["zoom_blur"])


def test_find_labels_csv_stream_and_clean_sets(tmp_path: Path) -> None:
    make_images(tmp_path / "stream", 4)
    rows = ["file,label,class,corruption"] + [f"img{i}.png,{i % 2},x,{['fog', 'snow'][i // 2]}" for i in range(4)]
    (tmp_path / "stream" / "labels.csv").write_text("\n".join(rows) + "\n")
    found = find_corrupted(tmp_path / "stream", ["cat", "dog"])
    assert found is not None and found.layout == "labels.csv"
    assert {c: [i.label for i in v] for c, v in found.by_corruption.items()} == {"snow": [0, 1], "fog": [0, 1]}
    make_images(tmp_path / "clean" / "cat", 2)
    assert find_corrupted(tmp_path / "clean", ["cat", "dog"]) is None


def test_unlabelled_images_are_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "fog" / "5" / "unknown", 2)
    with pytest.raises(TTAError, match="no labels"):
        find_corrupted(tmp_path, ["cat", "dog"])


def test_limit_keeps_the_same_images_for_every_corruption() -> None:
    limited = limit_items(_items(), 7, seed=0)
    names = [[i.key.split("/", 1)[1] for i in items] for items in limited.values()]
    assert len(names[0]) == 7 and names[0] == names[1] == names[2]
    assert limit_items(_items(), None, seed=0) == _items()
