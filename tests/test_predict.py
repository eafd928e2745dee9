"""``tta predict`` (``tta_cli.run.predict``) and the output flags shared with ``tta adapt``:
``--export-folder``, ``--format jsonl``, ``--json`` and the exported model's BatchNorm statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import CLASSES, csv_rows, invoke, make_class_folders, tiny_model_folder
from tta_cli.errors import TTAError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bn_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``test_resnet`` (BatchNorm) at 32 px with CIFAR-10 names."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny_resnet", arch="test_resnet")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("data") / "set", per_class=3)


def run(command: str, inputs: Path, model_dir: Path, out: Path, *extra: str | Path) -> dict:
    result = invoke(command, inputs, "--model", f"local-dir:{model_dir}", "--out", out, "--workers", "0",
                    "--batch-size", "8", "--quiet", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_predict_equals_adapt_with_the_source_method(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    record = run("predict", labelled, bn_model_dir, tmp_path / "p")
    run("adapt", labelled, bn_model_dir, tmp_path / "a", "--method", "source")
    predicted, adapted = csv_rows(tmp_path / "p" / "predictions.csv"), csv_rows(tmp_path / "a" / "predictions.csv")
    assert [r["pred"] for r in predicted] == [r["pred"] for r in adapted]
    assert [r["confidence"] for r in predicted] == [r["confidence"] for r in adapted]
    assert not (tmp_path / "p" / "model").exists()  # no model copy
    assert record["config"]["predict_only"] and record["method"]["method"] == "source"
    assert record["counts"]["labelled"] == len(CLASSES) * 3
    assert json.loads((tmp_path / "p" / "run.json").read_text())["accuracy"] == record["accuracy"]


def test_predict_skips_bad_files_like_adapt(tmp_path: Path, bn_model_dir: Path) -> None:
    folder = make_class_folders(tmp_path / "set", per_class=1)
    (folder / "cat" / "broken.png").write_bytes(b"not an image")
    record = run("predict", folder, bn_model_dir, tmp_path / "p")
    assert record["counts"]["skipped"] == 1
    assert csv_rows(tmp_path / "p" / "errors.csv")[0]["path"].endswith("broken.png")
    strict = invoke("predict", folder, "--model", f"local-dir:{bn_model_dir}", "--out", tmp_path / "q",
                    "--workers", "0", "--quiet", "--strict")
    assert isinstance(strict.exception, TTAError) and strict.exception.exit_code == 3


def test_predict_with_an_exported_model_folder(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    run("adapt", labelled, bn_model_dir, tmp_path / "a", "--method", "source")
    record = run("predict", labelled, tmp_path / "a" / "model", tmp_path / "p")
    assert record["counts"]["images"] == len(CLASSES) * 3
    assert ([r["pred"] for r in csv_rows(tmp_path / "p" / "predictions.csv")]
            == [r["pred"] for r in csv_rows(tmp_path / "a" / "predictions.csv")])


@pytest.mark.parametrize("mode", ["hardlink", "symlink", "copy"])
def test_export_folder_holds_every_image_once_under_its_predicted_class(
        labelled: Path, bn_model_dir: Path, tmp_path: Path, mode: str) -> None:
    export = tmp_path / "sorted"
    record = run("predict", labelled, bn_model_dir, tmp_path / "p", "--export-folder", export,
                 "--export-mode", mode)
    predictions = csv_rows(tmp_path / "p" / "predictions.csv")
    manifest = csv_rows(export / "manifest.csv")
    assert sorted(Path(r["source"]) for r in manifest) == sorted(p.resolve() for p in labelled.rglob("*.png"))
    for row, prediction in zip(manifest, predictions, strict=True):
        assert row["pred"] == prediction["pred"] and row["how"] == mode
        assert row["file"].split("/")[0] == CLASSES[int(row["pred"])]
        assert (export / row["file"]).read_bytes() == Path(row["source"]).read_bytes()
    assert record["export_folder"]["files"] == len(predictions) and not record["export_folder"]["failed"]


def test_min_confidence_sends_the_rest_to_uncertain(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    record = run("predict", labelled, bn_model_dir, tmp_path / "p", "--export-folder", tmp_path / "sorted",
                 "--min-confidence", "1")
    assert record["export_folder"]["uncertain"] == record["counts"]["images"]
    assert len(list((tmp_path / "sorted" / "_uncertain").iterdir())) == record["counts"]["images"]


def test_a_bad_export_option_fails_before_any_output(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    for extra in (["--export-mode", "move"], ["--format", "xml"], ["--export-bn", "mean"]):
        result = invoke("adapt", labelled, "--model", f"local-dir:{bn_model_dir}", "--out", tmp_path / "o", *extra)
        assert result.exit_code == 2 and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    result = invoke("predict", labelled, "--model", f"local-dir:{bn_model_dir}", "--out", tmp_path / "o",
                    "--export-folder", tmp_path / "full")
    assert isinstance(result.exception, TTAError) and "not empty" in str(result.exception)
    assert not (tmp_path / "o").exists()


def test_jsonl_predictions_have_the_csv_fields(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    run("predict", labelled, bn_model_dir, tmp_path / "c")
    run("predict", labelled, bn_model_dir, tmp_path / "j", "--format", "jsonl")
    rows = csv_rows(tmp_path / "c" / "predictions.csv")
    lines = (tmp_path / "j" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert not (tmp_path / "j" / "predictions.csv").exists() and len(lines) == len(rows)
    for line, row in zip(lines, rows, strict=True):
        record = json.loads(line)
        assert list(record) == list(row)
        assert record["pred"] == int(row["pred"]) and record["label"] == int(row["label"])
        assert record["top5"] == [int(j) for j in row["top5"].split()]
        assert f"{record['confidence']:.6f}" == row["confidence"] and record["frame"] is None


def test_exported_bn_model_agrees_with_the_late_predictions(labelled: Path, bn_model_dir: Path,
                                                            tmp_path: Path) -> None:
    stream = run("adapt", labelled, bn_model_dir, tmp_path / "s", "--method", "norm")
    source = run("adapt", labelled, bn_model_dir, tmp_path / "o", "--method", "norm", "--export-bn", "source")
    assert stream["model_export"]["bn_statistics"] == "stream"
    assert source["model_export"]["bn_statistics"] == "source"
    checked = stream["model_export"]["agreement"]
    assert checked["images"] == len(CLASSES) * 3  # fewer than the window: every image
    assert checked["share"] > source["model_export"]["agreement"]["share"]
    assert json.loads((tmp_path / "s" / "run.json").read_text())["model_export"] == stream["model_export"]


def test_methods_and_models_json(tmp_path: Path) -> None:
    assert "sar" in json.loads(invoke("methods", "--json").stdout)
    assert "vit_base" in json.loads(invoke("models", "--json").stdout)


def test_report_reads_jsonl_and_prints_json(labelled: Path, bn_model_dir: Path, tmp_path: Path) -> None:
    run("predict", labelled, bn_model_dir, tmp_path / "j", "--format", "jsonl")
    result = invoke("report", tmp_path / "j", "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert Path(written["html"]).is_file() and all(Path(p).is_file() for p in written["pngs"])
