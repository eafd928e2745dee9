"""Decode and preprocess stream items into ordered batches, in worker processes.

Workers decode items in chunks; chunks come back in order (the DataLoader keeps it) and are cut
into batches of exactly ``batch_size`` decoded images, so a skipped file never shifts the batch
boundaries of the rest. Items that cannot be read are skipped and reported with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from tta_cli.sources.items import Batch, StreamItem

Transform = Callable[[Image.Image], torch.Tensor]
Decoded = tuple[int, torch.Tensor | None, str | None]

MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default limit (decompression bombs beyond it)


def read_image(item: StreamItem) -> Image.Image:
    """Open an image as RGB (first frame of an animation, EXIF orientation applied)."""
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(item.path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(background, image)
            elif image.mode in ("I;16", "I;16B", "I;16L", "I"):
                image = image.point(lambda v: v / 256).convert("L")
            return image.convert("RGB")


def describe_error(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Decoder(torch.utils.data.Dataset):
    """Chunks of items decoded and transformed; a failure becomes (index, None, reason)."""

    def __init__(self, items: Sequence[StreamItem], transform: Transform, chunk: int) -> None:
        self.items = items
        self.transform = transform
        self.chunk = chunk

    def __len__(self) -> int:
        return (len(self.items) + self.chunk - 1) // self.chunk

    def __getitem__(self, index: int) -> list[Decoded]:
        start = index * self.chunk
        out: list[Decoded] = []
        for i in range(start, min(start + self.chunk, len(self.items))):
            try:
                out.append((i, self.transform(read_image(self.items[i])), None))
            except Exception as err:  # any unreadable file is skipped, not fatal
                out.append((i, None, describe_error(err)))
        return out


def _identity(chunk: list[Any]) -> Any:
    return chunk[0]


def decoded_stream(
    items: Sequence[StreamItem], transform: Transform, workers: int = 0, chunk: int = 16
) -> Iterator[Decoded]:
    """(index, image tensor or None, error) for every item, in stream order."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    dataset = _Decoder(items, transform, chunk)
    if workers <= 0:
        for i in range(len(dataset)):
            yield from dataset[i]
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=1,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    for decoded in loader:
        yield from decoded


def iter_batches(
    items: Sequence[StreamItem],
    transform: Transform,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """Batches of exactly ``batch_size`` decoded images (the last may be smaller), in order."""
    pending_items: list[StreamItem] = []
    pending_images: list[torch.Tensor] = []
    skipped: list[tuple[StreamItem, str]] = []
    decoded_count = 0

    def flush() -> Batch:
        nonlocal pending_items, pending_images, skipped, decoded_count
        images = torch.stack(pending_images)
        if pin_memory:
            images = images.pin_memory()
        batch = Batch(pending_items, images, decoded_count, skipped)
        decoded_count += len(pending_items)
        pending_items, pending_images, skipped = [], [], []
        return batch

    for index, image, error in decoded_stream(items, transform, workers, chunk=min(batch_size, 32)):
        if image is None:
            skipped.append((items[index], error or "unreadable"))
            continue
        pending_items.append(items[index])
        pending_images.append(image)
        if len(pending_items) == batch_size:
            yield flush()
    if pending_items:
        yield flush()
    elif skipped:
        yield Batch([], torch.empty(0), decoded_count, skipped)
