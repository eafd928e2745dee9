"""The tta command line, through Typer's CliRunner (and a subprocess for exit codes and start-up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner

from tests.helpers import csv_rows, make_images
from tta_cli.cli import app
from tta_cli.errors import TTAError
from tta_cli.methods import get_method_class, list_methods

runner = CliRunner()


def _adapt(tmp_path: Path, model_dir: Path, inputs: list[str], *flags: str):
    out = tmp_path / "out"
    args = ["adapt", *inputs, "--model", f"local-dir:{model_dir}", "--out", str(out), "--workers", "0", *flags]
    return runner.invoke(app, args), out


def _predictions(out: Path) -> list[dict[str, str]]:
    return csv_rows(out / "predictions.csv")


@pytest.mark.parametrize("method", list_methods())
def test_every_method_writes_the_three_outputs(method: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "images"
    make_images(folder, 10)
    result, out = _adapt(tmp_path, tiny_model_dir, [str(folder)], "--method", method, "-b", "4", "--quiet")
    assert result.exit_code == 0, result.output
    rows = _predictions(out)
    assert [r["path"] for r in rows] == [f"img{i}.png" for i in range(10)]  # natural order: img2 < img10
    assert [int(r["index"]) for r in rows] == list(range(10))
    assert all(len(r["top5"].split()) == 5 and r["label"] == "" for r in rows)
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["images"] == 10 and record["accuracy"] is None
    without_clean = get_method_class(method).without_clean_data  # eata and foa_shift need --clean
    assert record["method"]["method"] == (without_clean or method)
    assert set(record["versions"]) == {"tta", "torch", "timm", "python"}
    assert len(record["model"]["weights_sha256"]) == 64
    assert record["preprocessing"]["input_size"] == [3, 32, 32]
    reloaded = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True)
    assert reloaded.num_classes == 10


def test_subfolder_labels_give_accuracy(tmp_path: Path, tiny_model_dir: Path) -> None:
    for i, name in enumerate(["dog", "cat", "Frog"]):  # class names, matched case-insensitively
        make_images(tmp_path / "data" / name, 3, seed=i)
    result, out = _adapt(tmp_path, tiny_model_dir, [str(tmp_path / "data")], "--method", "tent", "-b", "2")
    assert result.exit_code == 0, result.output
    rows = _predictions(out)
    assert {r["label"] for r in rows} == {"3", "5", "6"}
    assert rows[0]["path"] == "cat/img0.png"  # natural order of folders too
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["labelled"] == 9 and record["accuracy"] is not None
    assert "acc" in result.output


def test_labels_csv_for_a_flat_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "flat"
    make_images(folder, 4)
    rows = "file,label,extra\nimg0.png,cat,x\nimg1.png,1,y\nimg2.png,ship,z\nimg3.png,9,w\n"
    (tmp_path / "labels.csv").write_text(rows)
    result, out = _adapt(tmp_path, tiny_model_dir, [str(folder)], "--labels", str(tmp_path / "labels.csv"),
                         "--method", "source")
    assert result.exit_code == 0, result.output
    assert [r["label"] for r in _predictions(out)] == ["3", "1", "8", "9"]


def test_bad_label_in_csv_is_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "flat"
    make_images(folder, 1)
    (tmp_path / "labels.csv").write_text("file,label\nimg0.png,unicorn\n")
    result, out = _adapt(tmp_path, tiny_model_dir, [str(folder)], "--labels", str(tmp_path / "labels.csv"))
    assert isinstance(result.exception, TTAError) and "unicorn" in str(result.exception)
    assert not out.exists()


def test_set_validates_keys_and_values(tmp_path: Path, tiny_model_dir: Path, image_folder: Path) -> None:
    result, _ = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "--method", "sar", "--set", "rho=0.1",
                         "--set", "bogus=1")
    assert isinstance(result.exception, TTAError)
    assert "bogus" in str(result.exception) and "rho" in str(result.exception)  # lists the valid keys
    result, _ = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "--method", "sar", "--set", "rho=abc")
    assert isinstance(result.exception, TTAError) and "rho" in str(result.exception)


def test_set_and_lr_reach_the_method(tmp_path: Path, tiny_model_dir: Path, image_folder: Path) -> None:
    result, out = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "--method", "sar", "--lr", "0.01",
                         "--steps", "2", "--set", "skip_empty=true", "--set", "rho=0.1", "-q")
    assert result.exit_code == 0, result.output
    method = json.loads((out / "run.json").read_text())["method"]
    assert method["lr"] == 0.01 and method["lr_source"] == "given"
    assert method["config"]["skip_empty"] is True and method["config"]["rho"] == 0.1
    assert method["config"]["steps"] == 2


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path, tiny_model_dir: Path, image_folder: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result, _ = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "-q")
    assert isinstance(result.exception, TTAError) and "--overwrite" in str(result.exception)
    result, out = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "-q", "--overwrite")
    assert result.exit_code == 0 and (out / "keep.txt").exists() and (out / "run.json").exists()


def test_batch_size_one_and_a_partial_last_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    folder = tmp_path / "images"
    make_images(folder, 5)
    result, out = _adapt(tmp_path, tiny_model_dir, [str(folder)], "-b", "1", "-q")
    assert result.exit_code == 0 and len(_predictions(out)) == 5
    result, out = _adapt(tmp_path, tiny_model_dir, [str(folder)], "-b", "2", "-q", "--overwrite")
    assert result.exit_code == 0 and json.loads((out / "run.json").read_text())["counts"]["batches"] == 3


def test_progress_and_summary_are_shown(tmp_path: Path, tiny_model_dir: Path, image_folder: Path) -> None:
    result, _ = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "-b", "4")
    assert result.exit_code == 0
    for text in ("preprocessing", "lr", "img/s", "resets", "used for updates", "mean entropy"):
        assert text in result.output


def test_methods_listing_describes_without_repeating_the_name_and_marks_the_default() -> None:
    listing = json.loads(runner.invoke(app, ["methods", "--json"]).output)
    for name, entry in listing.items():
        first = entry["summary"].split(":")[0].lower()
        assert name not in first.split() and "/" not in first, entry["summary"]
        assert entry["summary"][:1].isupper()
    assert [name for name, entry in listing.items() if entry["default"]] == ["auto"]
    table = runner.invoke(app, ["methods"], env={"COLUMNS": "200"}).output
    assert "auto (default)" in table and "eta / eata:" not in table


def test_methods_and_models_listing() -> None:
    result = runner.invoke(app, ["methods", "--json"])
    listing = json.loads(result.output)
    assert set(listing) == set(list_methods()) and "rho" in listing["sar"]["hyperparameters"]
    assert listing["deyo"]["choices"]["aug"] == ["patch", "occ", "pixel"]
    assert listing["lame"]["choices"]["affinity"] == ["rbf", "knn", "linear"]
    assert listing["deyo"]["accepts"]["steps"] == "an integer >= 1"
    table = runner.invoke(app, ["methods"], env={"COLUMNS": "400"}).output
    assert "aug=patch (patch|occ|pixel)" in table and all(name in table for name in list_methods())
    assert "vit_base" in runner.invoke(app, ["models"]).output


def _tta(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    code = "import sys; from tta_cli.cli import main; sys.argv = ['tta', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_user_errors_are_one_clean_line_with_non_zero_exit(tmp_path: Path) -> None:
    result = _tta("adapt", str(tmp_path / "missing"), "--model", "test_resnet", "--no-pretrained")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tta: error: input not found")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = _tta("adapt", str(tmp_path), "--model", "resnet5O")
    assert result.returncode == 2 and "did you mean" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = _tta("adapt", str(tmp_path / "missing"), "--model", "test_resnet", "--no-pretrained",
                  env={"TTA_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_does_not_import_torch() -> None:
    code = "import sys; import tta_cli.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False"
    assert _tta("--help").returncode == 0


def test_device_errors(tmp_path: Path, tiny_model_dir: Path, image_folder: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, _ = _adapt(tmp_path, tiny_model_dir, [str(image_folder)], "--device", "cuda")
    assert isinstance(result.exception, TTAError) and "CUDA" in str(result.exception)
