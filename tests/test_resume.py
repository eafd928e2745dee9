"""``tta adapt --resume``: a run killed (kill -9, SIGTERM, Ctrl-C) at any batch and resumed gives the
predictions, model and counts of a run that was never stopped (fault injection in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import CLASSES, make_images, save_timm_folder, tiny_model_folder, tiny_timm
from tta_cli.checkpoint import CHECKPOINT, KILL_AFTER_ENV, STOP_AFTER_ENV, skip_consumed
from tta_cli.cli import main
from tta_cli.ownership import record as record_output
from tta_cli.sources.items import StreamItem
from tta_cli.sources.stream import ImagePart, Stream

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model_folder(root / "model", "test_resnet")
    images = root / "images"
    make_images(images, 40)
    return model, images


def _args(model: Path, images: Path, out: Path, method: str) -> list[str]:
    return ["adapt", str(images), "-m", f"local-dir:{model}", "--method", method, "-b", "4", "--workers", "0",
            "--checkpoint-every", "3", "-o", str(out), "--quiet"]


def _tta(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "tta_cli", *args], env=environ, capture_output=True, text=True,
                          timeout=300)


def _in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


class References:
    """Uninterrupted runs, one per method, made when first asked for."""

    def __init__(self, setup: tuple[Path, Path], root: Path) -> None:
        self.setup, self.root, self.runs = setup, root, {}

    def __getitem__(self, method: str) -> Path:
        if method not in self.runs:
            out = self.root / method
            result = _tta(_args(*self.setup, out, method))
            assert result.returncode == 0, result.stderr
            self.runs[method] = out
        return self.runs[method]


@pytest.fixture(scope="module")
def reference(setup: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(setup, tmp_path_factory.mktemp("ref"))


def _assert_same_run(got: Path, want: Path) -> None:
    assert (got / "predictions.csv").read_bytes() == (want / "predictions.csv").read_bytes()
    a, b = load_file(str(got / "model" / "model.safetensors")), load_file(str(want / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    record, expected = json.loads((got / "run.json").read_text()), json.loads((want / "run.json").read_text())
    assert record["status"] == "completed"
    counts, expected_counts = record["counts"], expected["counts"]
    mean, expected_mean = counts.pop("mean_entropy"), expected_counts.pop("mean_entropy")
    assert counts == expected_counts
    assert mean == pytest.approx(expected_mean, rel=1e-12)
    assert record["resets_at_batch"] == expected["resets_at_batch"]
    assert record["health"] == expected["health"]  # over the whole stream, not the part after the resume
    assert record["collapse_events"] == expected["collapse_events"]
    assert not (got / CHECKPOINT).exists()  # a completed run leaves no checkpoint


@pytest.mark.parametrize(("method", "kill_after"), [
    ("tent", 2), ("tent", 7), ("source", 3), ("auto", 5),
    pytest.param("tent", 4, marks=pytest.mark.slow), pytest.param("tent", 10, marks=pytest.mark.slow),
    pytest.param("sar", 5, marks=pytest.mark.slow),
])
def test_kill_9_then_resume_matches_an_uninterrupted_run(setup: tuple[Path, Path], reference: References,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        method: str, kill_after: int) -> None:
    model, images = setup
    out = tmp_path / "run"
    killed = _tta(_args(model, images, out, method), {KILL_AFTER_ENV: str(kill_after)})
    assert killed.returncode == -9
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "running"  # never looks complete
    assert (out / CHECKPOINT).is_file()  # one from the start: resumable before the first --checkpoint-every
    modules = torch.load(out / CHECKPOINT, weights_only=True)["method"]["modules"]
    assert (modules is None) == (method == "source")  # a fixed model is rebuilt, not saved per checkpoint
    if modules is not None:  # and of an adapting one only what changes: norm layers, not convolutions
        assert modules and not any(name.endswith("conv1.weight") for name in modules)
    (out / ".checkpoint.pt.tmp-99999").write_bytes(b"half")  # as a kill during a write leaves them
    record_output(out, "model")  # as a run killed while writing model/ listed it first
    (out / "model.tmp-99999").mkdir()
    assert _in_process(monkeypatch, "adapt", "--resume", str(out)) == 0
    _assert_same_run(out, reference[method])
    assert not list(out.glob("*.tmp-*"))  # a completed resume leaves no temporary file


@pytest.mark.parametrize(("signal_name", "code"), [
    ("SIGTERM", 143), pytest.param("SIGINT", 130, marks=pytest.mark.slow)])
def test_signal_writes_an_interrupted_run_that_resumes(setup: tuple[Path, Path], reference: References,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      signal_name: str, code: int) -> None:
    model, images = setup
    out = tmp_path / "run"
    stopped = _tta(_args(model, images, out, "tent"), {STOP_AFTER_ENV: f"5:{signal_name}"})
    assert stopped.returncode == code, stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record["reason"]) == ("interrupted", signal_name)
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.glob("*.tmp-*"))
    assert _in_process(monkeypatch, "adapt", "--resume", str(out)) == 0
    _assert_same_run(out, reference["tent"])


def test_a_completed_run_is_not_resumed(reference: References, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert _in_process(monkeypatch, "adapt", "--resume", str(reference["tent"])) == 2
    assert "completed" in capsys.readouterr().err


def test_skip_consumed_slices_image_items_without_decoding() -> None:
    items = [StreamItem(f"{i}.png", Path(f"/nowhere/{i}.png")) for i in range(10)]
    stream = Stream([ImagePart(items[:4]), ImagePart(items[4:])])
    rest, left = skip_consumed(stream, 6)
    assert left == 0
    assert [i.key for p in rest.parts for i in p.items] == [f"{i}.png" for i in range(6, 10)]  # type: ignore[union-attr]


def test_iter_batches_drops_skipped_items_after_decoding(tmp_path: Path) -> None:
    """Inside a video the position is reached by decoding and dropping (frames are not sliceable)."""
    from tta_cli.sources.loader import iter_batches

    paths = make_images(tmp_path, 7)
    items = [StreamItem(p.name, p) for p in paths]
    batches = list(iter_batches(items, lambda image: torch.zeros(3, 2, 2), 4, skip_decoded=3))
    assert [[i.key for i in b.items] for b in batches] == [[p.name for p in paths[3:7]]]


class _Payload:
    """A pickle that would create a file if it were ever unpickled with code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.system, (f"touch {self.marker}",))


def test_resuming_with_other_weights_is_one_line_and_exit_2(setup: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint keeps only the tensors the run changed: the rest must come from the same model."""
    _, images = setup
    model = tiny_model_folder(tmp_path / "model", "test_resnet")
    out = tmp_path / "run"
    assert _tta(_args(model, images, out, "tent"), {KILL_AFTER_ENV: "4"}).returncode == -9
    other = tiny_timm("test_resnet", seed=1)
    other.pretrained_cfg = {**other.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    save_timm_folder(other, model, CLASSES)
    assert _in_process(monkeypatch, "adapt", "--resume", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "weights differ from those the run started with" in err


@pytest.mark.parametrize("content", ["random", "pickle"])
def test_a_tampered_checkpoint_is_one_line_and_exit_2(reference: References, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], content: str) -> None:
    """Issue #24.13: torch's 7-line message advising weights_only=False, exit 1."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["tent"], out)
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps(record | {"status": "interrupted"}))
    marker = tmp_path / "ran"
    if content == "random":
        (out / CHECKPOINT).write_bytes(os.urandom(3000))
    else:
        torch.save({"method": _Payload(marker)}, out / CHECKPOINT)
    assert _in_process(monkeypatch, "adapt", "--resume", str(out)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot read the checkpoint" in err
    assert "weights_only" not in err and not marker.exists()
