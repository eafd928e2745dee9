"""``tta bench`` end to end on a tiny model: files, fresh models per run, resume, and errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import csv_rows, invoke, make_class_folders
from tta_cli.bench.runner import BenchConfig, all_methods, parse_methods, parse_seeds, run_benchmark
from tta_cli.bench.settings import parse_settings
from tta_cli.errors import TTAError

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("bench") / "clean", per_class=2)


@pytest.fixture(scope="module")
def corrupted_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tta corrupt's layout, written directly (no corrupt-tta needed): fog at severity 5."""
    root = tmp_path_factory.mktemp("bench") / "corrupted"
    make_class_folders(root / "fog" / "5", per_class=2)
    return root


def _rows(out: Path) -> list[dict[str, str]]:
    return csv_rows(out / "results.csv")


def _config(model_dir: Path, data: Path, out: Path, methods: str, settings: str, **extra: object) -> BenchConfig:
    return BenchConfig(model=f"local-dir:{model_dir}", data=data, out=out, methods=parse_methods(methods),
                       settings=parse_settings(settings), batch_size=4, quiet=True, plots=False, threads=1,
                       **extra)  # type: ignore[arg-type]


def test_bench_writes_every_file(clean_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("corrupt_tta")
    out = tmp_path / "out"
    args = ["bench", "--model", f"local-dir:{tiny_model_dir}", "--data", str(clean_set), "--out", str(out),
            "--methods", "source,tent,eata,sar", "--settings", "mild,mixed,bs1,label-shift",
            "--corruptions", "fog,contrast", "--batch-size", "4", "--bs1-limit", "6",
            "--clean", str(clean_set), "--fisher-size", "8", "--threads", "1"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    streams = {(r["setting"], r["corruption"]) for r in rows}
    assert streams == {("mild", "fog"), ("mild", "contrast"), ("bs1", "fog"), ("bs1", "contrast"),
                       ("label-shift", "fog"), ("label-shift", "contrast"), ("mixed", "all")}
    assert len(rows) == 7 * 4 and {r["method"] for r in rows} == {"source", "tent", "eata", "sar"}
    sizes = {(r["setting"], r["corruption"]): (int(r["images"]), int(r["batch_size"])) for r in rows}
    assert sizes[("mild", "fog")] == (20, 4) and sizes[("mixed", "all")] == (40, 4)
    assert sizes[("bs1", "fog")] == (6, 1)
    assert (out / "data" / "fog" / "5" / "cat" / "img0.png").is_file()  # the clean set was corrupted
    plots = ("accuracy.png", "curves/mixed_all.png", "curves/label-shift_fog.png") if HAVE_MATPLOTLIB else ()
    for name in ("results.md", "curves.csv", "bench.json", *plots):
        assert (out / name).is_file(), name
    record = json.loads((out / "bench.json").read_text())
    assert record["config"]["methods"] == ["source", "tent", "eata", "sar"]
    assert record["preprocessing"]["input_size"] == [3, 32, 32]
    assert "| source |" in (out / "results.md").read_text()
    # The source model does not adapt: the same images give the same accuracy in any order.
    source = {(r["setting"], r["corruption"]): r["accuracy"] for r in rows if r["method"] == "source"}
    assert source[("mild", "fog")] == source[("label-shift", "fog")]


def test_every_run_starts_from_the_source_model(corrupted_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run after a destructive one (huge learning rate) equals the same run alone."""
    after = run_benchmark(_config(tiny_model_dir, corrupted_set, tmp_path / "a", "tent:lr=5,sar:lr=0.01", "mild",
                                  corruptions=["fog"]))
    alone = run_benchmark(_config(tiny_model_dir, corrupted_set, tmp_path / "b", "sar:lr=0.01", "mild",
                                  corruptions=["fog"]))
    first, second = after[1], alone[0]
    assert first.method == second.method == "sar:lr=0.01"
    assert (first.correct, first.mean_entropy, first.resets) == (second.correct, second.mean_entropy, second.resets)


def test_resume_runs_only_what_is_missing(corrupted_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_benchmark(_config(tiny_model_dir, corrupted_set, out, "source", "mild", corruptions=["fog"]))
    with pytest.raises(TTAError, match="not empty"):
        run_benchmark(_config(tiny_model_dir, corrupted_set, out, "source", "mild", corruptions=["fog"]))
    added = run_benchmark(_config(tiny_model_dir, corrupted_set, out, "source,norm", "mild", corruptions=["fog"],
                                  resume=True))
    assert [r.method for r in added] == ["norm"]
    assert [r["method"] for r in _rows(out)] == ["source", "norm"]
    with pytest.raises(TTAError, match="limit changed"):
        run_benchmark(_config(tiny_model_dir, corrupted_set, out, "source", "mild", corruptions=["fog"],
                              resume=True, limit=3))
    fresh = run_benchmark(_config(tiny_model_dir, corrupted_set, out, "tent", "mild", corruptions=["fog"],
                                  overwrite=True))
    assert len(fresh) == 1 and [r["method"] for r in _rows(out)] == ["tent"]


def test_eata_without_clean_images_runs_as_eta(corrupted_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    results = run_benchmark(_config(tiny_model_dir, corrupted_set, tmp_path / "o", "eata,eta", "mild",
                                    corruptions=["fog"]))
    assert [r.method for r in results] == ["eta"]


def test_method_specs_are_validated() -> None:
    specs = parse_methods("norm:bn_stats=batch:bn_alpha=0.2, sar")
    assert specs[0].name == "norm" and specs[0].hyperparameters == {"bn_stats": "batch", "bn_alpha": "0.2"}
    with pytest.raises(TTAError, match="unknown method"):
        parse_methods("sra")
    with pytest.raises(TTAError, match="key=value"):
        parse_methods("sar:lr")


def test_all_is_every_registered_method_source_first() -> None:
    from tta_cli.methods import list_methods

    names = [spec.name for spec in parse_methods("all")]
    assert sorted(names) == sorted(list_methods()) and names[0] == "source"
    assert all_methods() == names
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("3-5,3") == [3, 4, 5]
    with pytest.raises(TTAError, match="invalid seed"):
        parse_seeds("a")


def test_seeds_speed_and_online_view(clean_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results = run_benchmark(_config(tiny_model_dir, clean_set, out, "tent,source", "mild,continual",
                                    corruptions=["fog", "contrast"], seeds=[0, 1]))
    rows = _rows(out)
    assert len(rows) == 2 * 3 * 2  # 2 seeds x (2 mild + 1 continual streams) x 2 methods
    assert {(r["seed"], r["method"]) for r in rows} == {(s, m) for s in "01" for m in ("source", "tent")}
    assert rows[0]["method"] == "source"  # measured first: the others' k needs its speed
    for r in results:
        assert r.images_per_second and r.images_per_second > 0
        assert r.online_k is not None and r.online_accuracy is not None
        if r.method == "source":
            assert r.online_k == 1 and r.online_accuracy == r.accuracy
        elif r.online_k == 1:
            assert r.online_accuracy == r.accuracy
    # The source model does not adapt: every stream order gives it the same accuracy.
    source = {(r.setting, r.corruption, r.seed): r.accuracy for r in results if r.method == "source"}
    assert source[("mild", "fog", 0)] == source[("mild", "fog", 1)]
    curves = csv_rows(out / "curves.csv")
    assert {c["seed"] for c in curves} == {"0", "1"}
    record = json.loads((out / "bench.json").read_text())
    assert {s["seed"] for s in record["streams"]} == {0, 1} and record["config"]["seeds"] == [0, 1]
    continual = [s for s in record["streams"] if s["name"] == "continual/all"]
    assert continual[0]["order"] == ["fog", "contrast"] and continual[0]["images"] == 40
    text = (out / "results.md").read_text()
    assert "± 0.0" in text and "online accuracy" in text and "over 2 stream seeds" in text


def test_correlated_and_gradual_settings_run(clean_set: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_benchmark(_config(tiny_model_dir, clean_set, out, "source,norm", "correlated,mixed-correlated,gradual",
                          corruptions=["fog"], concentration=0.5))
    rows = _rows(out)
    assert {(r["setting"], r["corruption"]) for r in rows} == {
        ("correlated", "fog"), ("mixed-correlated", "all"), ("gradual", "all")}
    assert all(int(r["images"]) == 20 for r in rows)
    assert sorted(p.name for p in (out / "data" / "fog").iterdir()) == ["1", "2", "3", "4", "5"]
    record = json.loads((out / "bench.json").read_text())
    params = {s["name"]: s for s in record["streams"]}
    assert params["correlated/fog"]["concentration"] == 0.5
    assert params["gradual/all"]["levels"] == [1, 2, 3, 4, 5, 4, 3, 2, 1]
