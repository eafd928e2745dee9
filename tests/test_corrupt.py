"""``tta corrupt``: ImageNet-C layout, presets, determinism for a seed, resume, and clear errors.

The small generated images get the CIFAR-10-C preset (no corrupt-tta needed); the ImageNet-C
preset's tests skip without corrupt-tta. The strength of each corruption: tests/test_cifar_c.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import make_images
from tta_cli.bench.corrupt import (
    CORRUPTIONS,
    HELD_OUT,
    CorruptPlan,
    corrupt_folder,
    import_corrupt_tta,
    parse_corruptions,
    parse_preset,
    parse_severities,
    preset_for_size,
)
from tta_cli.cli import app
from tta_cli.errors import TTAError

runner = CliRunner()
needs_corrupt_tta = pytest.mark.skipif(
    __import__("importlib").util.find_spec("corrupt_tta") is None, reason="corrupt-tta is not installed")


@pytest.fixture
def clean_set(tmp_path: Path) -> Path:
    root = tmp_path / "clean"
    for i, name in enumerate(["cat", "dog", "ship"]):
        make_images(root / name, 2, seed=i)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_names_and_severities_parse() -> None:
    assert parse_corruptions("all") == list(CORRUPTIONS) and len(CORRUPTIONS) == 15
    assert parse_corruptions("held-out") == list(HELD_OUT)
    assert parse_corruptions(["fog,snow", "fog", "Gaussian-Noise"]) == ["fog", "snow", "gaussian_noise"]
    with pytest.raises(TTAError, match="did you mean fog"):
        parse_corruptions("fgo")
    assert parse_severities("1-3") == [1, 2, 3]
    assert parse_severities("5,3") == [5, 3]
    for bad in ("6", "0-2", "x"):
        with pytest.raises(TTAError):
            parse_severities(bad)


def test_layout_manifest_and_determinism(clean_set: Path, tmp_path: Path) -> None:
    names = ["gaussian_noise", "impulse_noise", "glass_blur", "fog"]
    first = corrupt_folder(CorruptPlan(clean_set, tmp_path / "a", names, [5, 3], seed=7))
    assert first.written == 6 * 4 * 2 and not first.failed
    assert (tmp_path / "a" / "fog" / "5" / "cat" / "img0.png").is_file()
    manifest = json.loads((tmp_path / "a" / "corrupt.json").read_text())
    assert manifest["seed"] == 7 and manifest["severities"] == [3, 5] and manifest["preset"] == "cifar"
    assert manifest["parameters"].startswith("CIFAR-10-C")
    assert manifest["corruptions"] == names
    # Same seed, another folder: identical bytes, impulse_noise included (its generator is seeded).
    corrupt_folder(CorruptPlan(clean_set, tmp_path / "b", names, [5, 3], seed=7))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # Another seed changes the noise.
    corrupt_folder(CorruptPlan(clean_set, tmp_path / "c", ["impulse_noise"], [5], seed=8))
    rel = "impulse_noise/5/dog/img1.png"
    assert not np.array_equal(_pixels(tmp_path / "a" / rel), _pixels(tmp_path / "c" / rel))


def test_an_image_does_not_depend_on_the_others(clean_set: Path, tmp_path: Path) -> None:
    full = corrupt_folder(CorruptPlan(clean_set, tmp_path / "full", ["shot_noise"], [5]))
    part = corrupt_folder(CorruptPlan(clean_set, tmp_path / "part", ["shot_noise"], [5], limit=2))
    assert full.images == 6 and part.images == 2
    for rel, data in _files(tmp_path / "part").items():
        assert _files(tmp_path / "full")[rel] == data


def test_resume_adds_and_refuses_other_settings(clean_set: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    corrupt_folder(CorruptPlan(clean_set, dst, ["fog"], [5]))
    again = corrupt_folder(CorruptPlan(clean_set, dst, ["fog", "contrast"], [5]))
    assert again.existing == 6 and again.written == 6
    assert json.loads((dst / "corrupt.json").read_text())["corruptions"] == ["fog", "contrast"]
    with pytest.raises(TTAError, match=r"other settings \(corrupt.json: seed 0 \(now 1\)\)"):
        corrupt_folder(CorruptPlan(clean_set, dst, ["fog"], [5], seed=1))
    shutil.copytree(clean_set, tmp_path / "elsewhere")
    with pytest.raises(TTAError, match=r"corrupt.json: source .* \(now .*elsewhere\)\)"):
        corrupt_folder(CorruptPlan(tmp_path / "elsewhere", dst, ["fog"], [5]))
    redone = corrupt_folder(CorruptPlan(clean_set, dst, ["fog"], [5], seed=1), overwrite=True)
    assert redone.written == 6


def test_crop_and_clean(tmp_path: Path) -> None:
    make_images(tmp_path / "src" / "cat", 1, size=48)
    corrupt_folder(CorruptPlan(tmp_path / "src", tmp_path / "out", ["clean", "fog"], [5], crop=32))
    clean = _pixels(tmp_path / "out" / "clean" / "5" / "cat" / "img0.png")
    assert clean.shape == (32, 32, 3)
    original = np.asarray(Image.open(tmp_path / "src" / "cat" / "img0.png"))
    assert np.array_equal(clean, original[8:40, 8:40])
    assert _pixels(tmp_path / "out" / "fog" / "5" / "cat" / "img0.png").shape == (32, 32, 3)


def test_a_flat_folder_is_refused(tmp_path: Path) -> None:
    make_images(tmp_path / "flat", 2)
    with pytest.raises(TTAError, match="not class-foldered"):
        corrupt_folder(CorruptPlan(tmp_path / "flat", tmp_path / "out", ["fog"]))


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "corrupt_tta", None)  # makes `import corrupt_tta` fail
    with pytest.raises(TTAError) as err:
        import_corrupt_tta()
    assert "tta-cli[bench]" in str(err.value)


def test_cli_corrupt(clean_set: Path, tmp_path: Path) -> None:
    dst = tmp_path / "c"
    result = runner.invoke(app, ["corrupt", str(clean_set), str(dst), "--corruption", "fog,contrast",
                                 "--severity", "5", "--seed", "3", "--limit", "4"])
    assert result.exit_code == 0, result.output
    assert len(list(dst.rglob("*.png"))) == 8
    again = runner.invoke(app, ["corrupt", str(clean_set), str(dst), "-c", "fog", "--seed", "4"])
    assert again.exit_code != 0 and isinstance(again.exception, TTAError)


def test_presets_by_size_and_recorded(tmp_path: Path) -> None:
    assert preset_for_size(32, 32) == "cifar" and preset_for_size(64, 48) == "cifar"
    assert preset_for_size(65, 32) == "imagenet" and preset_for_size(224, 224) == "imagenet"
    assert parse_preset("CIFAR") == "cifar"
    with pytest.raises(TTAError, match="unknown preset"):
        parse_preset("svhn")
    make_images(tmp_path / "src" / "cat", 1, size=96)
    assert CorruptPlan(tmp_path / "src", tmp_path / "o", ["fog"]).concrete_preset() == "imagenet"
    assert CorruptPlan(tmp_path / "src", tmp_path / "o", ["fog"], crop=32).concrete_preset() == "cifar"
    # An explicit cifar preset works on large images too, without corrupt-tta.
    corrupt_folder(CorruptPlan(tmp_path / "src", tmp_path / "o", ["contrast"], [5], preset="cifar"))
    assert _pixels(tmp_path / "o" / "contrast" / "5" / "cat" / "img0.png").shape == (96, 96, 3)


def test_another_preset_is_another_identity(clean_set: Path, tmp_path: Path) -> None:
    corrupt_folder(CorruptPlan(clean_set, tmp_path / "o", ["contrast"], [5]))
    manifest = tmp_path / "o" / "corrupt.json"
    # A folder made before the presets existed holds ImageNet-C pixels: it is not resumed as cifar.
    record = json.loads(manifest.read_text())
    del record["preset"]
    manifest.write_text(json.dumps(record))
    with pytest.raises(TTAError, match="preset imagenet"):
        corrupt_folder(CorruptPlan(clean_set, tmp_path / "o", ["contrast"], [5]))


def test_cli_corrupt_cifar_needs_no_corrupt_tta(clean_set: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "corrupt_tta", None)
    result = runner.invoke(app, ["corrupt", str(clean_set), str(tmp_path / "c"), "-c", "all,held-out",
                                 "--preset", "cifar", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "c").rglob("*.png"))) == 19
    refused = runner.invoke(app, ["corrupt", str(clean_set), str(tmp_path / "d"), "--preset", "imagenet"])
    assert isinstance(refused.exception, TTAError) and "corrupt-tta" in str(refused.exception)


@needs_corrupt_tta
def test_imagenet_preset_is_deterministic(tmp_path: Path) -> None:
    make_images(tmp_path / "src" / "cat", 2, size=80)
    names = ["gaussian_noise", "impulse_noise", "fog"]
    for out in ("a", "b"):
        corrupt_folder(CorruptPlan(tmp_path / "src", tmp_path / out, names, [5], seed=7))
    assert json.loads((tmp_path / "a" / "corrupt.json").read_text())["preset"] == "imagenet"
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_cli_stays_light() -> None:
    """The commands import corrupt-tta, matplotlib and torch only when they run."""
    code = ("import sys, tta_cli.cli; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'corrupt_tta') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
