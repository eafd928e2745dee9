"""``tta_cli.run`` and what keeps a run honest: atomic outputs, run.json's status, --overwrite,
symbolic links, a full disk, the non-finite guard and fp16 with no scaled loss yet."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import make_images, tiny_model_folder, tiny_timm
from tta_cli.atomic import atomic_write_dir, atomic_write_text
from tta_cli.cli import main
from tta_cli.engine import device_outputs
from tta_cli.methods import create_method, method_config
from tta_cli.methods.base import StepResult
from tta_cli.sinks.predictions import PredictionsWriter

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "m", "test_resnet")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    make_images(folder, 12)
    return folder


def _run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def _adapt(model: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["adapt", str(images), "-m", f"local-dir:{model}", "--method", "tent", "-b", "4", "--workers", "0",
            "-o", str(out), "--quiet", *extra]


def _record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


# --- atomic outputs ------------------------------------------------------------------------------

def test_atomic_write_dir_replaces_an_old_folder_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def write(folder: Path) -> None:
        (folder / "new.txt").write_text("new")

    atomic_write_dir(target, write)
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "run.json"
    atomic_write_text(target, "old")

    def fail(folder: Path) -> None:
        (folder / "half").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_dir(tmp_path / "model", fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_completed_run_is_recorded_so(model: Path, images: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _run(monkeypatch, capsys, *_adapt(model, images, out))[0] == 0
    record = _record(out)
    assert record["status"] == "completed" and record["counts"]["non_finite_updates"] == 0
    assert sorted(p.name for p in out.iterdir()) == [".tta-outputs.json", "model", "predictions.csv", "run.json"]


# --- --overwrite and links -----------------------------------------------------------------------

def test_overwrite_removes_only_the_previous_runs_files(model: Path, images: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert _run(monkeypatch, capsys, *_adapt(model, images, out, "--format", "jsonl"))[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "thesis.tmp-final.docx").write_text("mine too")  # named like a temporary file, not tta's
    (out / ".model.tmp-99999").mkdir()  # a killed run's temporary folder: tta's
    assert _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite"))[0] == 0
    assert not (out / "predictions.jsonl").exists()  # the old run's predictions are gone: this run wrote CSV
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "thesis.tmp-final.docx").read_text() == "mine too"
    assert not (out / ".model.tmp-99999").exists()
    assert sorted(p.name for p in out.iterdir()) == [".tta-outputs.json", "model", "notes.txt", "predictions.csv",
                                                     "run.json", "thesis.tmp-final.docx"]


def test_overwrite_refuses_an_output_name_no_run_recorded(model: Path, images: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("a user's own table")
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite"))
    assert code == 2 and "predictions.csv, which no tta run recorded writing" in err
    assert (out / "predictions.csv").read_text() == "a user's own table"


def test_a_symlinked_output_file_is_never_written_through(model: Path, images: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    out = tmp_path / "out"
    assert _run(monkeypatch, capsys, *_adapt(model, images, out))[0] == 0
    (out / "run.json").unlink()
    (out / "run.json").symlink_to(outside)  # listed as the run's: --overwrite removes the link itself
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite"))
    assert outside.read_text() == "precious"
    assert code == 0, err
    assert not (out / "run.json").is_symlink()
    (out / "errors.csv").symlink_to(outside)  # not listed: refused, never followed
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite"))
    assert code == 2 and "errors.csv" in err and outside.read_text() == "precious"


def test_a_symlinked_out_folder_is_refused_without_overwrite(model: Path, images: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, link))
    assert code == 2 and "symbolic link" in err
    assert list(real.iterdir()) == []


def test_a_usage_error_found_late_deletes_nothing(model: Path, images: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out, export = tmp_path / "out", tmp_path / "export"
    assert _run(monkeypatch, capsys, *_adapt(model, images, out))[0] == 0
    before = sorted(p.name for p in out.iterdir())
    export.mkdir()
    (export / "notes.txt").write_text("mine")
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite", "--export-folder", str(export)))
    assert code == 2 and "not from an earlier export" in err
    assert sorted(p.name for p in out.iterdir()) == before and (out / "model" / "model.safetensors").is_file()
    assert _record(out)["status"] == "completed"


def test_a_second_run_on_a_locked_folder_fails_at_once(model: Path, images: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from tta_cli.ownership import FolderLock

    out = tmp_path / "out"
    assert _run(monkeypatch, capsys, *_adapt(model, images, out))[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with FolderLock(out):  # as a run in another process holds it
        code, err = _run(monkeypatch, capsys, *_adapt(model, images, out, "--overwrite"))
    assert code == 2 and err.count("\n") == 1 and "in use by another tta run" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != ".tta-lock"} == before


def test_a_symlinked_out_folder_with_overwrite_is_refused(model: Path, images: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "predictions.csv").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, link, "--overwrite"))
    assert code == 2 and "symbolic link" in err
    assert (real / "predictions.csv").read_text() == "keep"


# --- failures ------------------------------------------------------------------------------------

def test_disk_full_is_one_line_a_failed_record_and_whole_rows(model: Path, images: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    real = PredictionsWriter._write_rows
    calls = {"n": 0}

    def full_after_two(self: PredictionsWriter, rows: list[list[object]]) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # the header and one batch, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "predictions.csv"))
        real(self, rows)

    monkeypatch.setattr(PredictionsWriter, "_write_rows", full_after_two)
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out))
    assert code == 4
    assert err.strip().count("\n") == 0 and "disk full writing" in err and "Traceback" not in err
    record = _record(out)
    assert record["status"] == "failed" and record["reason"].startswith("disk full")
    lines = (out / "predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + 4  # the header and the one batch written whole


def test_an_unexpected_error_is_recorded_as_failed(model: Path, images: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tta_cli.methods.tent import Tent

    def broken(self: Tent, x: torch.Tensor) -> StepResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(Tent, "forward_and_adapt", broken)
    out = tmp_path / "out"
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out))
    assert code == 1 and "boom" in err
    assert _record(out)["status"] == "failed" and "boom" in _record(out)["reason"]


# --- the non-finite guard ------------------------------------------------------------------------

def test_non_finite_batch_skips_its_update_and_restores_the_last_good_state() -> None:
    method = create_method("tent", tiny_timm("test_resnet"), method_config("tent", lr=0.01), batch_size=4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    method.step(x)
    good = [p.detach().clone() for p in method.params]
    momentum = [b.clone() for b in method.momentum_buffers()]
    bad = x.clone()
    bad[1] = float("nan")
    result = method.step(bad)
    assert method.non_finite_updates == 1
    for param, before in zip(method.params, good, strict=True):
        assert torch.equal(param, before)
    for buffer, before in zip(method.momentum_buffers(), momentum, strict=True):
        assert torch.equal(buffer, before)
    assert device_outputs(result)["pred"][1] == -1  # no silent class 0
    method.step(x)
    assert all(torch.isfinite(p).all() for p in method.params)
    assert method.non_finite_updates == 1


def test_an_inf_learning_rate_is_caught_by_the_guard() -> None:
    method = create_method("tent", tiny_timm("test_resnet"), method_config("tent", lr=1e38), batch_size=4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1e6
    for _ in range(3):
        method.step(x)
    assert all(torch.isfinite(p).all() for p in method.params)


def test_predictions_row_for_a_non_finite_logit_has_no_class(tmp_path: Path) -> None:
    from tta_cli.outputs import BatchOutputs
    from tta_cli.sources.items import Batch, StreamItem

    writer = PredictionsWriter(tmp_path / "p.csv", ["a", "b"])
    batch = Batch([StreamItem("x.png", tmp_path / "x.png")], torch.zeros(1, 3, 2, 2), 0)
    writer.on_batch(BatchOutputs(batch, torch.tensor([-1]), torch.tensor([float("nan")]),
                                 torch.tensor([float("nan")]), torch.tensor([[0, 1]]), torch.tensor([False]),
                                 (), False, 0.0))
    writer.close()
    row = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
    assert row[4:7] == ["-1", "", ""]


def test_sar_fp16_without_a_reliable_sample_steps_without_a_scale() -> None:
    """GradScaler.step raised 'Attempted step but _scale is None' on the first batch."""
    sar = create_method("sar", tiny_timm("test_resnet"), method_config("sar"), batch_size=4)
    sar.configure_performance("fp16")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        result = sar.step(x)
    assert torch.isfinite(result.logits).all()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 200 KiB tmpfs (root only; skipped where it cannot be mounted), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_fails_cleanly(model: Path, images: Path, small_disk: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The predictions fit, the 1.5 MB model does not: one line, exit 4, no half-written model/."""
    out = small_disk / "out"
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out))
    assert code == 4 and "disk full writing" in err and "--out" in err
    assert not (out / "model").exists() and not list(out.glob("*.tmp-*"))
    assert _record(out)["status"] == "failed"
    assert (out / "predictions.csv").read_text().endswith("\n")


@pytest.mark.parametrize("extra", [("--method", "tent", "--lr", "1e30"), ("--method", "lame", "-b", "1")])
def test_non_finite_logits_give_pred_minus_one_rows_and_a_finite_model(
        model: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], extra: tuple[str, ...]) -> None:
    """Issue #24.10: exit 1 in the monitor's bincount; then NaN statistics exported while health said ok."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    monkeypatch.setattr("tta_cli.methods.lame.affinity_matrix",  # LAME's one-image case fixed: force NaN
                        lambda features, kind, knn: torch.full((len(features),) * 2, float("nan")))
    code, err = _run(monkeypatch, capsys, *_adapt(model, images, out), *extra)
    assert code == 0, err
    record = _record(out)
    rows = (out / "predictions.csv").read_text().splitlines()[1:]
    non_finite = [row for row in rows if row.split(",")[4] == "-1"]
    assert non_finite and all(row.split(",")[5] == "" for row in non_finite)
    assert record["health"]["verdict"] != "ok"
    assert record["health"]["non_finite_predictions"] == len(non_finite)
    state = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
