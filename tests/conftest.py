"""Shared test helpers: the ../shared folder, tiny timm models and generated images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``$TTA_SHARED`` or ``../shared`` beside the repository, if present."""
    env = os.environ.get("TTA_SHARED")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared"]:
        if (candidate / "README.md").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared is absent (set TTA_SHARED to its path)")
    return path


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_images(folder: Path, n: int, size: int = 32, prefix: str = "img", seed: int = 0,
                suffix: str = ".png") -> list[Path]:
    """``n`` random RGB images ``prefix0 .. prefix{n-1}`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    make_images(folder, 12)
    return folder


def save_timm_folder(model: torch.nn.Module, folder: Path, label_names: list[str] | None = None) -> Path:
    """Save a timm model as a local-dir folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, str(folder / "config.json"),
                       model_config={"label_names": label_names} if label_names else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``test_vit`` at 32 px with 10 named classes, as a local-dir folder."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return save_timm_folder(model, tmp_path_factory.mktemp("models") / "tiny_vit", names)
