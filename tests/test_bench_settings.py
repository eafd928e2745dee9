"""The benchmark's streams per setting, and finding the corrupted images they are made of."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_images
from tta_cli.bench.data import find_corrupted, limit_items
from tta_cli.bench.settings import GRADUAL_LEVELS, POOLED, SETTINGS, build_streams, parse_settings
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


def _labels(stream_items: list[StreamItem]) -> list[int]:
    return [int(item.label) for item in stream_items]  # type: ignore[arg-type]


def _class_switches(labels: list[int]) -> int:
    return len(_runs(labels)) - 1


def test_continual_is_the_mild_streams_one_after_another() -> None:
    data = _items()
    mild = build_streams(data, ["mild"], batch_size=8, seed=2)
    (continual,) = build_streams(data, ["continual"], batch_size=8, seed=2)
    assert continual.corruption == POOLED and continual.batch_size == 8
    assert [i.key for i in continual.items] == [i.key for s in mild for i in s.items]
    assert continual.params["order"] == CORRUPTIONS and continual.params["seed"] == 2


def test_correlated_labels_follow_the_concentration() -> None:
    data = _items(per_class=20)
    strong = build_streams(data, ["correlated"], seed=0, concentration=0.01)
    weak = build_streams(data, ["correlated"], seed=0, concentration=100.0)
    assert [s.corruption for s in strong] == CORRUPTIONS
    for s_strong, s_weak in zip(strong, weak, strict=True):
        # Every image exactly once.
        assert sorted(i.key for i in s_strong.items) == sorted(i.key for i in data[s_strong.corruption])
        assert sorted(i.key for i in s_weak.items) == sorted(i.key for i in data[s_weak.corruption])
        # Small gamma: few long single-class runs; large gamma: every class in every slot.
        assert _class_switches(_labels(s_strong.items)) < 25
        assert _class_switches(_labels(s_weak.items)) >= 90
        assert s_strong.params["concentration"] == 0.01
    # Neither shuffled like mild nor ordered class by class like label-shift.
    (label_shift,) = build_streams({"fog": data["fog"]}, ["label-shift"], seed=0)
    assert _class_switches(_labels(label_shift.items)) == 9
    assert _class_switches(_labels(weak[1].items)) > 9


def test_correlated_streams_are_deterministic_and_seeded() -> None:
    data = _items(per_class=10)
    first = build_streams(data, ["correlated", "mixed-correlated"], seed=1)
    again = build_streams(data, ["correlated", "mixed-correlated"], seed=1)
    other = build_streams(data, ["correlated", "mixed-correlated"], seed=2)
    assert [[i.key for i in s.items] for s in first] == [[i.key for i in s.items] for s in again]
    assert [i.key for i in first[0].items] != [i.key for i in other[0].items]
    # Different corruptions get different draws.
    assert _labels(first[0].items) != _labels(first[1].items)
    with pytest.raises(TTAError, match="concentration"):
        build_streams(data, ["correlated"], concentration=0.0)


def test_mixed_correlated_pools_corruptions_and_correlates_labels() -> None:
    data = _items(per_class=20)
    (stream,) = build_streams(data, ["mixed-correlated"], seed=0, concentration=0.01)
    assert stream.corruption == POOLED and len(stream.items) == 600
    assert _class_switches(_labels(stream.items)) < 30
    corruptions = [i.key.split("/")[0] for i in stream.items]
    assert len(_runs(corruptions)) > 100  # the corruptions are mixed within a class's run
    assert stream.params["algorithm"].startswith("NOTE")


def _by_severity(per_class: int = 2) -> dict[int, dict[str, list[StreamItem]]]:
    return {level: {c: [StreamItem(f"{c}/c{k}/{i}.png", Path(f"s{level}/{c}/c{k}/{i}.png"), k)
                        for k in range(10) for i in range(per_class)] for c in CORRUPTIONS}
            for level in range(1, 6)}


def test_gradual_goes_up_and_down_in_severity_per_corruption() -> None:
    levels = _by_severity()
    (stream,) = build_streams(levels[5], ["gradual"], seed=0, by_severity=levels)
    assert len(stream.items) == 3 * 20 and stream.params["levels"] == list(GRADUAL_LEVELS)
    seen = [(item.key.split("/")[0], int(item.key.split("/")[1])) for item in stream.items]
    assert _runs([c for c, _ in seen]) == CORRUPTIONS  # one corruption after another
    for corruption in CORRUPTIONS:
        severities = [s for c, s in seen if c == corruption]
        assert _runs(severities) == [1, 2, 3, 4, 5, 4, 3, 2, 1]
        # The item at each level is that severity's file of the same image, each image once.
        items = [i for i in stream.items if i.key.startswith(corruption)]
        assert all(str(i.path).startswith(f"s{i.key.split('/')[1]}/") for i in items)
        assert len({i.key.split("/", 2)[2] for i in items}) == 20
    again = build_streams(levels[5], ["gradual"], seed=0, by_severity=levels)[0]
    assert [i.key for i in again.items] == [i.key for i in stream.items]


def test_gradual_needs_every_severity() -> None:
    levels = _by_severity()
    del levels[3]
    with pytest.raises(TTAError, match="severities 1-5"):
        build_streams(levels[5], ["gradual"], by_severity=levels)


def test_every_setting_records_its_parameters() -> None:
    levels = _by_severity()
    streams = build_streams(levels[5], list(SETTINGS), batch_size=16, seed=4, bs1_limit=3,
                            by_severity=levels)
    assert {s.setting for s in streams} == set(SETTINGS)
    for stream in streams:
        assert stream.params["seed"] == 4 and stream.params["description"] == SETTINGS[stream.setting]
        assert stream.params["batch_size"] == stream.batch_size
    assert parse_settings("continual,correlated,mixed-correlated,gradual") == [
        "continual", "correlated", "mixed-correlated", "gradual"]
