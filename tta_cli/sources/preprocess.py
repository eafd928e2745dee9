"""The model's evaluation preprocessing with its tensor tail done once per chunk of images.

timm's evaluation transform is a torchvision ``Compose``: image steps on the PIL image (resize,
crop), then ``ToTensor`` and ``Normalize`` on each image's tensor. On small images the per-image
tensor steps cost more than the decoding (seven tensor operations per image), so
:class:`ChunkedTransform` keeps the image steps per image, keeps each image's pixels as 8-bit, and
runs ``ToTensor`` and ``Normalize``'s arithmetic on a whole chunk at once: the same operations in
the same order on every value (convert, divide by 255, subtract the mean, divide by the standard
deviation, each rounded to float32), so the result equals the per-image transform bit for bit
(``tests/test_sources_preprocess.py``). A transform of any other shape is used as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

_TO_TENSOR = ("ToTensor", "MaybeToTensor")


class ChunkedTransform:
    """``transform(image)`` as the wrapped transform; ``pixels`` then ``finish`` for a chunk."""

    def __init__(self, image_steps: Callable[[Image.Image], Image.Image], mean: Sequence[float] | torch.Tensor,
                 std: Sequence[float] | torch.Tensor, whole: Callable[[Image.Image], torch.Tensor]) -> None:
        self.image_steps = image_steps
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.whole = whole
        """The wrapped transform (for images that are not 8-bit RGB after the image steps)."""

    @functools.cached_property
    def kept_size(self) -> tuple[int, int] | None:
        """The (width, height) of the 8-bit RGB images the image steps leave as they are (no
        resize, no crop), if any: their output size (every image comes out at the model's input
        size), when an image of random pixels of that size, which any resampling or crop would
        change, comes out unchanged."""
        rng = np.random.default_rng(0)
        try:
            size = self.image_steps(Image.fromarray(rng.integers(0, 256, (61, 61, 3), dtype=np.uint8), "RGB")).size
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            after = self.image_steps(Image.fromarray(pixels, "RGB"))
        except Exception:  # image steps that cannot take such an image: no speed path, as before
            return None
        unchanged = after.mode == "RGB" and after.size == size and np.array_equal(np.asarray(after), pixels)
        return size if unchanged else None

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The image after the image steps: (H, W, 3) uint8 for 8-bit RGB, else the whole
        transform's float tensor (which ``finish`` then leaves as it is)."""
        image = self.image_steps(image)
        if image.mode != "RGB":
            return self.whole(image)
        return torch.from_numpy(np.array(image, np.uint8, copy=True))

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, normalised: ``ToTensor`` then ``Normalize``."""
        x = pixels.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.pixels(image)
        return self.finish(pixels[None])[0] if pixels.dtype == torch.uint8 else pixels

    def __repr__(self) -> str:
        return f"ChunkedTransform({self.whole!r})"


def chunked(transform: Any) -> Any:
    """``transform`` as a :class:`ChunkedTransform` where it ends with ``ToTensor`` and an
    out-of-place ``Normalize`` after PIL image steps (timm's evaluation transforms); else as is."""
    from torchvision import transforms

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, transforms.Compose) or steps is None or len(steps) < 2:
        return transform
    *image_steps, to_tensor, normalize = steps
    if type(to_tensor).__name__ not in _TO_TENSOR or not isinstance(normalize, transforms.Normalize):
        return transform
    if normalize.inplace or any(type(step).__name__ in _TO_TENSOR for step in image_steps):
        return transform
    return ChunkedTransform(transforms.Compose(image_steps), normalize.mean, normalize.std, transform)
