"""sources/jpeg: the speed path gives Pillow's pixels, and hands every other file to Pillow."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from tta_cli.sources import loader
from tta_cli.sources.items import StreamItem
from tta_cli.sources.jpeg import fast_jpeg_pixels, jpeg_header
from tta_cli.sources.loader import read_image
from tta_cli.sources.preprocess import ChunkedTransform, chunked

CIFAR = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
         "mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.2435, 0.2616)}


def _photo(width: int = 32, height: int = 32, seed: int = 0) -> Image.Image:
    """Smooth colours with some noise: chroma subsampling and the IDCT have something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, "JPEG", **options)
    return path


@pytest.mark.parametrize("subsampling", [0, 1, 2])
@pytest.mark.parametrize("progressive", [False, True])
def test_the_speed_path_gives_pillows_pixels(tmp_path: Path, subsampling: int, progressive: bool) -> None:
    for seed, (width, height) in enumerate([(32, 32), (33, 17), (64, 48)]):
        path = _save(_photo(width, height, seed), tmp_path / f"{seed}.jpg", quality=85, subsampling=subsampling,
                     progressive=progressive)
        pixels = fast_jpeg_pixels(path, (width, height), None)
        assert pixels is not None and pixels.dtype == torch.uint8
        assert np.array_equal(pixels.numpy(), np.asarray(read_image(path)))


def test_the_header_gives_size_components_and_metadata(tmp_path: Path) -> None:
    header = jpeg_header(_save(_photo(40, 24), tmp_path / "a.jpg").read_bytes())
    assert header == (24, 40, 3, False)
    grey = _save(_photo().convert("L"), tmp_path / "grey.jpg").read_bytes()
    assert jpeg_header(grey) is not None and jpeg_header(grey).components == 1  # type: ignore[union-attr]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    assert jpeg_header(_save(_photo(), tmp_path / "exif.jpg", exif=exif).read_bytes()).app1  # type: ignore[union-attr]
    png = io.BytesIO()
    _photo().save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(b"\xff\xd8\x00garbage") is None


def test_files_the_speed_path_leaves_to_pillow(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = _save(_photo(32, 16), tmp_path / "rotated.jpg", exif=exif)
    assert fast_jpeg_pixels(rotated, (32, 16), None) is None
    assert read_image(rotated).size == (16, 32)  # Pillow applies the orientation
    assert fast_jpeg_pixels(_save(_photo().convert("L"), tmp_path / "grey.jpg"), (32, 32), None) is None
    assert fast_jpeg_pixels(_save(_photo().convert("CMYK"), tmp_path / "cmyk.jpg"), (32, 32), None) is None
    whole = _save(_photo(), tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    assert fast_jpeg_pixels(tmp_path / "truncated.jpg", (32, 32), None) is None
    plain = _save(_photo(), tmp_path / "plain.jpg")
    assert fast_jpeg_pixels(plain, (32, 32), None) is not None
    assert fast_jpeg_pixels(plain, (40, 40), None) is None  # the steps would resize
    assert fast_jpeg_pixels(plain, (32, 32), 32 * 32 - 1) is None  # over the pixel limit: Pillow's error
    assert fast_jpeg_pixels(tmp_path / "missing.jpg", (32, 32), None) is None
    named_png = tmp_path / "plain.png"  # a JPEG named otherwise: Pillow reads it
    named_png.write_bytes(plain.read_bytes())
    assert fast_jpeg_pixels(named_png, (32, 32), None) is None


def test_the_image_steps_keep_only_the_models_input_size() -> None:
    transform = chunked(create_transform(**CIFAR, is_training=False))
    assert isinstance(transform, ChunkedTransform)
    assert transform.kept_size == (32, 32)
    imagenet = chunked(create_transform(input_size=(3, 224, 224), crop_pct=0.875, is_training=False))
    assert imagenet.kept_size is None  # resized to 256, then cropped: no size comes out unchanged


def test_the_loader_gives_the_same_batches_with_and_without_the_speed_path(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [_save(_photo(32, 32, seed), tmp_path / f"{seed}.jpg", quality=90) for seed in range(6)]
    paths.append(_save(_photo(48, 40, 9), tmp_path / "larger.jpg"))  # resized by the steps: Pillow
    items = [StreamItem(key=p.name, path=p) for p in paths]
    transform = chunked(create_transform(**CIFAR, is_training=False))

    def decoded() -> list[torch.Tensor]:
        return [image for _, image, _ in loader._run(loader._ImageDecoder(items, transform, 4, None, None), 0)]

    fast = decoded()
    monkeypatch.setattr(loader, "fast_jpeg_pixels", lambda *args: None)
    assert all(torch.equal(a, b) for a, b in zip(fast, decoded(), strict=True))
