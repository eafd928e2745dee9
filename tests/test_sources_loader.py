"""The loader: reading every kind of image, skipping bad ones with a reason, order and batch boundaries."""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import make_images, png_header_only, resize_to_tensor
from tta_cli.sources import Batch, StreamItem, folder_items
from tta_cli.sources.loader import MAX_IMAGE_PIXELS, decoded_stream, iter_batches, read_image

RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return resize_to_tensor(image, 8)


def save(path: Path, image: Image.Image, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(("mode", "suffix"), [
    ("CMYK", ".jpg"), ("CMYK", ".tif"), ("LA", ".png"), ("1", ".png"), ("1", ".bmp"), ("L", ".jpg"),
    ("LAB", ".tif"), ("YCbCr", ".jpg"), ("RGBA", ".webp"), ("P", ".gif"), ("I;16", ".png"),
])
def test_modes_read_as_rgb_of_the_same_size(tmp_path: Path, mode: str, suffix: str) -> None:
    path = save(tmp_path / f"image{suffix}", Image.fromarray(PIXELS).convert(mode))
    image = read_image(path)
    assert (image.mode, image.size) == ("RGB", (30, 20))


def test_transparent_palette_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    path = save(tmp_path / "t.png", image, transparency=0)
    pixels = np.asarray(read_image(path))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[1, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_keeps_the_top_byte(tmp_path: Path) -> None:
    values = np.array([[0, 256, 65535]], dtype=np.uint16)
    path = save(tmp_path / "deep.png", Image.fromarray(values))
    assert np.asarray(read_image(path))[0, :, 0].tolist() == [0, 1, 255]


@pytest.mark.parametrize(("values", "expected"), [
    (np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    (np.array([[0.0, 100.0, 255.0]], np.float32), [0, 100, 255]),
])
def test_float_pixels_are_scaled(tmp_path: Path, values: np.ndarray, expected: list[int]) -> None:
    path = save(tmp_path / "f.tif", Image.fromarray(values))
    assert np.asarray(read_image(path))[0, :, 0].tolist() == expected


def test_float_pixels_without_a_range_are_refused(tmp_path: Path) -> None:
    path = save(tmp_path / "f.tif", Image.fromarray(np.array([[-5.0, 1e6]], np.float32)))
    [(_, image, reason)] = decoded_stream([StreamItem("f.tif", path)], to_tensor)
    assert image is None and "outside the range" in (reason or "")


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), color) for color in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = save(tmp_path / "anim.gif", frames[0], save_all=True, append_images=frames[1:], duration=50)
    assert np.asarray(read_image(path))[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    path = save(tmp_path / "rotated.jpg", image, exif=exif, quality=95)
    turned = np.asarray(read_image(path))
    assert turned.shape == (20, 10, 3)
    assert turned[:10].mean() > 200 and turned[10:].mean() < 50  # the white half is now on top


def test_pixel_limit_skips_between_one_and_two_times_and_beyond(tmp_path: Path) -> None:
    # PIL itself only warns between 1x and 2x its limit: both must be skipped.
    items = [StreamItem(name, save(tmp_path / name, Image.new("RGB", size)))
             for name, size in (("ok.png", (30, 30)), ("warn.png", (40, 40)), ("error.png", (100, 100)))]
    results = list(decoded_stream(items, to_tensor, max_pixels=1000))
    assert results[0][1] is not None
    for _, image, reason in results[1:]:
        assert image is None and "too many pixels" in (reason or "") and "--max-pixels" in (reason or "")
    assert all(r[1] is not None for r in decoded_stream(items, to_tensor, max_pixels=0))
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # the global is restored


def test_decompression_bomb_header_is_skipped_at_the_default_limit(tmp_path: Path) -> None:
    path = png_header_only(tmp_path / "bomb.png", 10_000, 10_000)  # between 1x and 2x PIL's limit
    bigger = png_header_only(tmp_path / "bigger.png", 20_000, 10_000)  # beyond 2x
    cases = ((StreamItem("bomb.png", path), "100,000,000"), (StreamItem("big.png", bigger), "200,000,000"))
    for item, pixels in cases:
        [(_, image, reason)] = decoded_stream([item], to_tensor)
        assert image is None and f"too many pixels ({pixels} pixels" in (reason or "")


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("zero.png", b"", "empty file"),
    ("text.jpg", b"hello, I am not a picture", "not an image"),
    ("random.png", bytes(RNG.integers(0, 256, 500, dtype=np.uint8)), "not an image"),
])
def test_unreadable_files_get_a_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    [(_, image, why)] = decoded_stream([StreamItem(name, path)], to_tensor)
    assert image is None and reason in (why or "")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_skipped(tmp_path: Path, fmt: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    [(_, image, reason)] = decoded_stream([StreamItem(path.name, path)], to_tensor)
    assert image is None and "truncated" in (reason or "")


def test_broken_and_looping_links_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    items = [StreamItem(n, tmp_path / n) for n in ("gone.png", "a.png")]
    reasons = [reason for _, _, reason in decoded_stream(items, to_tensor)]
    assert reasons == ["file not found (removed, or a broken symbolic link)", "symbolic link loop"]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_order_and_batch_boundaries_survive_skipped_files(tmp_path: Path, workers: int) -> None:
    make_images(tmp_path, 23, size=12)
    for i in (0, 5, 6, 22):
        (tmp_path / f"img{i}.png").write_bytes(b"broken")
    items = folder_items(tmp_path, [])
    batches = list(iter_batches(items, to_tensor, batch_size=4, workers=workers))
    assert [len(b.items) for b in batches] == [4, 4, 4, 4, 3]
    assert [b.first_index for b in batches] == [0, 4, 8, 12, 16]
    good = [i.key for b in batches for i in b.items]
    assert good == [f"img{i}.png" for i in range(23) if i not in (0, 5, 6, 22)]
    skipped = [(item.key, len(b.items)) for b in batches for item, _ in b.skipped]
    assert [key for key, _ in skipped] == ["img0.png", "img5.png", "img6.png", "img22.png"]


def test_only_bad_files_still_report_them(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    [batch] = list(iter_batches([StreamItem("x.png", tmp_path / "x.png")], to_tensor, batch_size=4))
    assert batch.items == [] and [item.key for item, _ in batch.skipped] == ["x.png"]


def test_workers_give_identical_tensors(tmp_path: Path) -> None:
    make_images(tmp_path, 40, size=16)
    items = folder_items(tmp_path, [])
    inline = torch.cat([b.images for b in iter_batches(items, to_tensor, 7, workers=0)])
    pooled = torch.cat([b.images for b in iter_batches(items, to_tensor, 7, workers=2)])
    assert torch.equal(inline, pooled)


def slow_to_tensor(image: Image.Image) -> torch.Tensor:
    time.sleep(0.05)  # a decode that waits rather than computes: parallel even on a busy machine
    return to_tensor(image)


def consume(batches: Iterable[Batch], step_seconds: float) -> tuple[list[str], float]:
    start = time.perf_counter()
    keys = []
    for batch in batches:
        time.sleep(step_seconds)  # the adaptation step
        keys += [item.key for item in batch.items]
    return keys, time.perf_counter() - start


@pytest.mark.slow
def test_workers_decode_in_parallel_and_ahead_of_the_step(tmp_path: Path) -> None:
    make_images(tmp_path, 24, size=8)
    items = folder_items(tmp_path, [])
    inline_keys, inline = consume(iter_batches(items, slow_to_tensor, 4, workers=0), 0.2)  # 1.2 + 1.2 s
    pooled_keys, pooled = consume(iter_batches(items, slow_to_tensor, 4, workers=2), 0.2)
    assert pooled_keys == inline_keys
    assert pooled < 0.8 * inline, (pooled, inline)  # decoding overlapped the steps


def test_draft_decodes_large_jpegs_at_reduced_scale_never_below_the_side(tmp_path: Path) -> None:
    from PIL import Image

    from tta_cli.sources.loader import read_image

    jpeg, png = tmp_path / "big.jpg", tmp_path / "big.png"
    Image.new("RGB", (1024, 768), (200, 30, 90)).save(jpeg, quality=90)
    Image.new("RGB", (1024, 768), (200, 30, 90)).save(png)
    assert read_image(jpeg).size == (1024, 768)
    assert read_image(jpeg, draft_side=256).size == (512, 384)  # 1/2: 1/4 would give 192 < 256
    assert read_image(jpeg, draft_side=180).size == (256, 192)
    assert read_image(jpeg, draft_side=2000).size == (1024, 768)  # never upscaled
    assert read_image(png, draft_side=180).size == (1024, 768)  # not a JPEG: unchanged
