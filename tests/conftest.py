"""Fixtures shared by the test files (the helpers themselves are in ``tests/helpers.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import make_images, tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """``$TTA_SHARED`` or ``../shared`` beside the repository, if present."""
    env = os.environ.get("TTA_SHARED")
    for candidate in ([Path(env)] if env else []) + [ROOT.parent / "shared"]:
        if (candidate / "README.md").is_file():
            return candidate
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA: skipped where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
def reference_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One thread, as the authors' reference outputs were made; OMP_NUM_THREADS also keeps tta from
    tuning it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread() -> None:
    """One intra-op thread: for tiny models on a shared 2-core machine, two spinning threads run a
    step ~50x slower."""
    torch.set_num_threads(1)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    make_images(folder, 12)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ``test_vit`` at 32 px with 10 named classes, as a local-dir folder."""
    return tiny_model_folder(tmp_path_factory.mktemp("models") / "tiny_vit")
