"""The chunked preprocessing equals timm's evaluation transform bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms

from tta_cli.sources.items import StreamItem
from tta_cli.sources.loader import pack_finished, unpack
from tta_cli.sources.preprocess import ChunkedTransform, chunked

CONFIGS = [
    {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear",
     "mean": (0.4914, 0.4822, 0.4465), "std": (0.247, 0.2435, 0.2616)},
    {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bicubic",
     "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
    {"input_size": (3, 64, 48), "crop_pct": 0.95, "crop_mode": "squash", "interpolation": "bilinear",
     "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
]


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(32, 32), (40, 57), (300, 200), (17, 90)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)][::-1], 3), dtype=np.uint8), "RGB")
            for i in range(count)]


@pytest.mark.parametrize("config", CONFIGS, ids=["cifar", "imagenet", "squash"])
def test_a_chunk_equals_the_transform_image_by_image(config: dict) -> None:
    timm_transform = create_transform(**config, is_training=False)
    fast = chunked(timm_transform)
    assert isinstance(fast, ChunkedTransform)
    images = _images(12)
    want = torch.stack([timm_transform(image) for image in images])
    assert torch.equal(fast.finish(torch.stack([fast.pixels(image) for image in images])), want)
    assert torch.equal(torch.stack([fast(image) for image in images]), want)
    assert fast.finish(torch.stack([fast.pixels(image) for image in images])).is_contiguous()


def test_other_transforms_are_used_as_they_are() -> None:
    normalize = transforms.Normalize((0.5,), (0.5,))
    for transform in (transforms.ToTensor(), transforms.Compose([normalize, transforms.ToTensor()]),
                      transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,), inplace=True)])):
        assert chunked(transform) is transform


def test_an_image_that_is_not_rgb_after_the_steps_takes_the_whole_transform() -> None:
    fast = chunked(transforms.Compose([transforms.CenterCrop(32), transforms.ToTensor(),
                                       transforms.Normalize((0.5,), (0.5,))]))
    assert isinstance(fast, ChunkedTransform)
    gray = Image.fromarray(np.full((32, 32), 7, np.uint8), "L")
    pixels = fast.pixels(gray)
    assert pixels.dtype == torch.float32 and pixels.shape == (1, 32, 32)  # the wrapped transform's own
    assert torch.equal(fast(gray), fast.whole(gray))


def test_a_chunk_keeps_its_order_errors_and_finished_tensors() -> None:
    """Mixed shapes and a cached (already finished) tensor: each image finished alone, in order."""
    fast = chunked(create_transform(**{**CONFIGS[2], "crop_pct": 1.0, "crop_mode": "center"}, is_training=False))
    images = _images(3)
    cached = torch.zeros(3, 64, 48)
    items = [StreamItem(f"{i}.png", None) for i in range(5)]  # type: ignore[arg-type]
    decoded = [(items[0], fast.pixels(images[0]), None), (items[1], None, "unreadable"), (items[2], cached, None),
               (items[3], fast.pixels(images[1]), None), (items[4], fast.pixels(images[2]), None)]
    out = list(unpack(pack_finished(decoded, fast)))
    expected = [(f"{i}.png", "unreadable" if i == 1 else None) for i in range(5)]
    assert [(item.key, error) for item, _, error in out] == expected
    assert torch.equal(out[0][1], fast.whole(images[0])) and torch.equal(out[2][1], cached)
    assert torch.equal(out[4][1], fast.whole(images[2]))
    same = [(items[0], fast.pixels(images[0]), None), (items[1], None, "x"), (items[3], fast.pixels(images[1]), None)]
    _, stacked = pack_finished(same, fast)
    assert isinstance(stacked, torch.Tensor) and stacked.shape == (2, 3, 64, 48)  # one tensor: one hand-over
