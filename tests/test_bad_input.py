"""Bad input end to end through the CLI: bad files are skipped and listed, bad inputs stop the run cleanly."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import csv_rows, make_images, png_header_only, write_video
from tta_cli.cli import main

RNG = np.random.default_rng(1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _odd_but_good(folder: Path) -> list[str]:
    """Images in unusual modes and forms that must be read correctly."""
    rgb = Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("LA").save(folder / "la.png")
    rgb.convert("P").save(folder / "palette_alpha.png", transparency=0)
    Image.fromarray(RNG.integers(0, 65535, (40, 50)).astype(np.uint16)).save(folder / "deep16.png")
    rgb.convert("1").save(folder / "bits1.png")
    rgb.save(folder / "animated.gif", save_all=True, append_images=[rgb.rotate(90)], duration=40)
    exif = rgb.getexif()
    exif[0x0112] = 8
    rgb.save(folder / "rotated.jpg", exif=exif)
    return ["animated.gif", "bits1.png", "cmyk.jpg", "deep16.png", "la.png", "palette_alpha.png",
            "rotated.jpg"]


def _bad(folder: Path) -> dict[str, str]:
    """Each kind of bad file, with a word its reason in errors.csv must contain."""
    (folder / "zero.png").write_bytes(b"")
    (folder / "words.jpg").write_text("this is a text file with an image suffix")
    (folder / "noise.png").write_bytes(RNG.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    png_header_only(folder / "bomb.png", 10_000, 10_000)  # PIL would only warn about this one
    png_header_only(folder / "bigbomb.png", 20_000, 20_000)
    Image.fromarray(np.array([[-3.0, 1e9]], np.float32)).save(folder / "wild.tif")
    (folder / "dangling.png").symlink_to(folder / "not-there.png")
    return {"zero.png": "empty", "words.jpg": "not an image", "noise.png": "not an image",
            "cut.jpg": "truncated", "bomb.png": "too many pixels", "bigbomb.png": "too many pixels",
            "wild.tif": "outside", "dangling.png": "not found"}


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, list[str], dict[str, str]]:
    folder = tmp_path / "mixed"
    good = [p.name for p in make_images(folder, 4)] + _odd_but_good(folder)
    return folder, good, _bad(folder)


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
            *args: str) -> tuple[int, str]:
    """``tta ARGS`` in this process: the exit code and what went to stderr."""
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


def adapt_args(model: Path, out: Path, *inputs: Path | str) -> list[str]:
    return ["adapt", *map(str, inputs), "-m", f"local-dir:{model}", "-o", str(out), "-b", "4", "--quiet"]


def test_mixed_folder_and_video(mixed: tuple[Path, list[str], dict[str, str]], tmp_path: Path,
                                tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    folder, good, bad = mixed
    clip = write_video(tmp_path / "clip.mp4")
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, *adapt_args(tiny_model_dir, out, folder, clip),
                        "--every", "3", "--workers", "1")
    assert code == 0, err
    assert f"warning: {len(bad)} inputs could not be read" in err and "Traceback" not in err
    predicted = [r["path"] for r in csv_rows(out / "predictions.csv")]
    frames = [f"{clip.as_posix()}#frame={i:06d}" for i in range(0, 30, 3)]
    assert predicted == sorted(predicted[:len(good)]) + frames  # the folder first, then the video
    assert sorted(p.rsplit("/", 1)[-1] for p in predicted[:len(good)]) == sorted(good)
    errors = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in csv_rows(out / "errors.csv")}
    assert set(errors) == set(bad)
    for name, word in bad.items():
        assert word in errors[name], (name, errors[name])
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["skipped"] == len(bad)
    assert record["counts"]["images"] == len(good) + len(frames)
    assert record["counts"]["stream_items"] == len(good) + len(frames) + len(bad)


def test_strict_fails_at_the_end_with_all_outputs(mixed: tuple[Path, list[str], dict[str, str]],
                                                  tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder, good, bad = mixed
    out = tmp_path / "run"
    args = adapt_args(tiny_model_dir, out, folder)
    code, err = run_cli(monkeypatch, capsys, *args, "--strict", "--workers", "0")
    assert code == 3
    assert err.strip().splitlines()[-1] == f"tta: error: {len(bad)} inputs could not be read (--strict)"
    assert len(csv_rows(out / "predictions.csv")) == len(good) and len(csv_rows(out / "errors.csv")) == len(bad)
    assert (out / "run.json").is_file()


def test_nothing_readable_is_a_failure(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    _bad(folder)
    args = adapt_args(tiny_model_dir, tmp_path / "run", folder)
    code, err = run_cli(monkeypatch, capsys, *args, "--workers", "0")
    assert code == 3 and "none of the inputs could be read" in err


def _fatal_case(kind: str, root: Path) -> tuple[Path, str]:
    """An input that must stop the run before any output, and what the message names."""
    if kind == "missing":
        return root / "no-such-folder", "input not found"
    if kind == "empty folder":
        (root / "empty").mkdir()
        return root / "empty", "no images in"
    if kind == "corrupt video":
        (root / "broken.mp4").write_bytes(RNG.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        return root / "broken.mp4", "cannot read video"
    if kind == "zero-byte video":
        (root / "empty.mkv").write_bytes(b"")
        return root / "empty.mkv", "cannot read video"
    if kind == "symlink loop":
        (root / "loop1").symlink_to(root / "loop2")
        (root / "loop2").symlink_to(root / "loop1")
        return root / "loop1", "symbolic link loop"
    if kind == "missing list entry":
        (root / "list.txt").write_text("gone.png\n")
        return root / "list.txt", "does not exist"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "empty folder", "corrupt video", "zero-byte video",
                                  "symlink loop", "missing list entry"])
def test_bad_inputs_stop_cleanly_before_any_output(kind: str, tmp_path: Path, tiny_model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, message = _fatal_case(kind, tmp_path)
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, *adapt_args(tiny_model_dir, out, path))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tta: error: ") and message in lines[0] and str(path) in lines[0]
    assert not out.exists()


def test_unwritable_output_is_named(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "imgs", 2)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"  # below a regular file: can never be created
    code, err = run_cli(monkeypatch, capsys, *adapt_args(tiny_model_dir, out, tmp_path / "imgs"))
    assert code == 2 and err.strip() == (f"tta: error: cannot write to output folder {out}: Not a directory "
                                         "(choose another --out)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes anything")
def test_permission_denied(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "imgs", 2)
    (tmp_path / "imgs").chmod(0)
    try:
        args = adapt_args(tiny_model_dir, tmp_path / "run", tmp_path / "imgs")
        code, err = run_cli(monkeypatch, capsys, *args)
    finally:
        (tmp_path / "imgs").chmod(0o755)
    assert code == 2 and "permission denied" in err


@pytest.mark.slow
def test_one_clean_line_or_a_traceback_with_tta_debug(tmp_path: Path, tiny_model_dir: Path) -> None:
    args = [sys.executable, "-m", "tta_cli", *adapt_args(tiny_model_dir, tmp_path / "run", tmp_path / "nope")]
    clean = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 2
    assert clean.stderr.strip().splitlines() == [
        f"tta: error: input not found: {tmp_path / 'nope'} (check the path; inputs are image folders, "
        "images, videos (.mp4 .mkv .avi .mov .webm) or lists (.txt, .csv))"]
    env = {**os.environ, "TTA_DEBUG": "1"}
    debug = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "TTAError" in debug.stderr
    assert not (tmp_path / "run").exists()


def test_odd_file_names_and_numbered_folders(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Names that are not UTF-8 are predicted or skipped, never fatal; formula-like names are
    neutralised; sub-folders 1/, 2/ (camera ids) are not labels; the bomb reason states the limit."""
    folder = tmp_path / "cams"
    make_images(folder / "1", 2)
    make_images(folder / "2", 1, prefix="=shot", seed=3)
    raw = os.fsencode(folder)
    try:
        os.rename(raw + b"/1/img1.png", raw + b"/1/caf\xe9.png")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    (folder / "2" / os.fsdecode(b"bad\xff.png")).write_bytes(b"not an image")
    png_header_only(folder / "2" / "-bomb.png", 200, 200)
    out = tmp_path / "run"
    args = [a for a in adapt_args(tiny_model_dir, out, folder) if a != "--quiet"]
    code, err = run_cli(monkeypatch, capsys, *args, "--workers", "1", "--method", "tent", "--max-pixels", "30000")
    assert code == 0 and "Traceback" not in err, err
    console = " ".join(err.split())  # rich wraps long lines
    assert "labels: none (" in console and "sub-folders 1, 2 are not class names" in console
    text = (out / "predictions.csv").read_bytes().decode("utf-8")  # valid UTF-8 throughout
    assert "1/caf\\xe9.png" in text
    assert [r["path"] for r in csv_rows(out / "predictions.csv")] == ["1/caf\\xe9.png", "1/img0.png", "2/=shot0.png"]
    # (the key column starts with the folder, so "2/=shot0.png" needs no quote; a formula at the start does)
    errors = {r["path"]: r["reason"] for r in csv_rows(out / "errors.csv")}
    assert set(errors) == {"2/bad\\xff.png", "2/-bomb.png"}
    assert "above the limit of 30,000" in errors["2/-bomb.png"]
    record = json.loads((out / "run.json").read_text())
    assert record["counts"]["images"] == 3 and record["counts"]["skipped"] == 2 and record["accuracy"] is None
    assert (out / "model" / "model.safetensors").is_file()


def test_formula_like_keys_are_quoted(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "x", 1, prefix="=1+1")
    (tmp_path / "x" / "@bad.png").write_bytes(b"")
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, *adapt_args(tiny_model_dir, out, tmp_path / "x"), "--workers", "0",
                        "--method", "norm")
    assert code == 0, err
    (prediction,) = csv_rows(out / "predictions.csv")
    assert prediction["path"] == "'=1+1" + "0.png" and prediction["index"] == "0"
    assert float(prediction["confidence"]) > 0  # numbers are left as numbers
    assert csv_rows(out / "errors.csv")[0]["path"] == "'@bad.png"


def _user_error_case(kind: str, root: Path, model: Path) -> tuple[list[str], str]:
    """Arguments for a run that must stop with one line before any output, and what it must say."""
    make_images(root / "flat", 2)
    if kind == "latin-1 labels":
        (root / "labels.csv").write_bytes("file,label\nimg0.png,caf\u00e9\n".encode("latin-1"))
        return ["--labels", str(root / "labels.csv")], "line 2 is not valid utf-8 (byte 0xe9) (give its encoding with"
    if kind == "conflicting labels":
        (root / "labels.csv").write_text("file,label\nimg0.png,cat\nimg1.png,dog\n./img0.png,dog\n")
        return ["--labels", str(root / "labels.csv")], "img0.png two labels: 'cat' on line 2 and 'dog' on line 4"
    if kind == "config list":
        (root / "m").mkdir()
        (root / "m" / "config.json").write_text("[1, 2, 3]")
        return ["-m", f"local-dir:{root / 'm'}"], "holds a JSON list, not an object"
    if kind == "config without architecture":
        (root / "m").mkdir()
        (root / "m" / "config.json").write_text('{"num_classes": 10}')
        return ["-m", f"local-dir:{root / 'm'}"], "has no 'architecture'"
    if kind == "nan weights":
        from safetensors.torch import load_file, save_file

        (root / "m").mkdir()
        (root / "m" / "config.json").write_text((model / "config.json").read_text())
        state = load_file(str(model / "model.safetensors"))
        state["head.weight"][0, 0] = float("nan")
        save_file(state, str(root / "m" / "model.safetensors"))
        return ["-m", f"local-dir:{root / 'm'}"], "head.weight holds 1 NaN or infinite values"
    if kind == "numbered folders as names":
        make_images(root / "flat" / "7", 1)
        return ["--labels-from-folders", "names"], "--labels-from-folders names: "
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["latin-1 labels", "conflicting labels", "config list", "config without architecture",
                                  "nan weights", "numbered folders as names"])
def test_user_errors_are_one_line_before_any_output(kind: str, tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    extra, message = _user_error_case(kind, tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    args = adapt_args(tiny_model_dir, out, tmp_path / "flat")
    if "-m" in extra:  # replace the model
        at = args.index("-m")
        args[at + 1] = extra[extra.index("-m") + 1]
        extra = []
    code, err = run_cli(monkeypatch, capsys, *args, *extra, "--workers", "0")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "unexpected error" not in err, err
    assert lines[0].startswith("tta: error: ") and message in lines[0]
    assert not out.exists()


def test_labels_encoding_reads_a_latin_1_csv(tmp_path: Path, tiny_model_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "flat", 2)
    (tmp_path / "labels.csv").write_bytes("file,label\n./img0.png,ship\nimg1.png,7\n".encode("latin-1"))
    out = tmp_path / "run"
    code, err = run_cli(monkeypatch, capsys, *adapt_args(tiny_model_dir, out, tmp_path / "flat"), "--workers", "0",
                        "--labels", str(tmp_path / "labels.csv"), "--labels-encoding", "latin-1", "--method", "norm")
    assert code == 0, err
    assert [r["label"] for r in csv_rows(out / "predictions.csv")] == ["8", "7"]
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["labels_encoding"] == "iso8859-1" and record["counts"]["labelled"] == 2
