"""Decode and preprocess a stream into ordered batches, in worker processes.

Images are decoded by a pool of workers in chunks; the DataLoader hands chunks back in order
and keeps a few ahead, so the next batch is being prepared while the current one adapts. A video
is decoded in one pass by one worker (its frames depend on the ones before). The decoded images
are cut into batches of exactly ``batch_size``, so a skipped file never shifts the batch
boundaries of the rest. Anything that cannot be read is skipped and reported with the reason.
"""

from __future__ import annotations

import contextlib
import errno
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from tta_cli.config import MAX_IMAGE_PIXELS
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.jpeg import fast_jpeg_pixels
from tta_cli.sources.preprocess import ChunkedTransform
from tta_cli.sources.stream import ImagePart, Stream, VideoPart
from tta_cli.sources.video import FrameCache, FrameError, iter_frames

Transform = Callable[[Image.Image], torch.Tensor]
Decoded = tuple[StreamItem, torch.Tensor | None, str | None]
Packed = tuple[list[tuple[StreamItem, str | None]], torch.Tensor | list[torch.Tensor]]
"""A chunk as it crosses from a worker: (item, reason) pairs, and the images of the good ones."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class UnsupportedImage(ValueError):
    """Pixels that have no faithful 8-bit RGB reading."""


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """PIL's bomb limit set to ``max_pixels`` (None or 0: none), and its warning made an error.

    PIL raises only beyond twice its limit and merely warns between once and twice; turning the
    warning into an error makes ``max_pixels`` the exact limit. The global is restored after.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels or None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_image(source: StreamItem | Path, max_pixels: int | None = MAX_IMAGE_PIXELS,
               draft_side: int | None = None) -> Image.Image:
    """Open an image as RGB: first frame of an animation, EXIF orientation applied.

    ``draft_side``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    draft mode) when both sides stay at least this long, the resize target of the model's
    preprocessing; much faster on large photos, and the resize that follows sees fewer pixels
    (results change slightly: docs/PERFORMANCE.md). Other formats ignore it.
    """
    path = source.path if isinstance(source, StreamItem) else source
    with _pixel_limit(max_pixels), Image.open(path) as image:
        if draft_side and image.format == "JPEG":
            image.draft(None, (draft_side, draft_side))
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: alpha composited on white, 16-bit and float pixels scaled."""
    if image.mode in _WIDE_MODES:
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit integers keep their top 8 bits; floats in 0..1 are scaled by 255."""
    pixels = np.asarray(image)
    if image.mode.startswith("I;16"):
        return Image.fromarray((pixels.astype(np.uint16) >> 8).astype(np.uint8), "L")
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0:
        raise UnsupportedImage(f"{image.mode} pixels outside the range of an image ({low:g}..{high:g})")
    if image.mode == "F" and high <= 1.0:
        pixels = pixels * 255.0
    elif high > 255:
        if image.mode == "F" or high > 65535:
            raise UnsupportedImage(f"{image.mode} pixels outside 0..255 and 0..65535 (max {high:g})")
        pixels = pixels / 256.0  # 16-bit data stored in 32-bit integers
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def describe_error(err: BaseException, path: Path | None = None, max_pixels: int | None = None) -> str:
    """A short reason for ``errors.csv``: what is wrong with the file, not a traceback.

    ``max_pixels`` is the limit in force: PIL's error above twice its limit states twice the limit.
    """
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        found = _BOMB.search(str(err))
        limit = max_pixels or (int(found[2]) if found else 0)
        size = f"{int(found[1]):,} pixels, above the limit of {limit:,}" if found else str(err)
        return f"too many pixels ({size}): a decompression bomb? (--max-pixels raises the limit)"
    if isinstance(err, UnidentifiedImageError):
        if path is not None and path.is_file() and path.stat().st_size == 0:
            return "empty file (0 bytes)"
        return "not an image, or a format PIL cannot read"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, FileNotFoundError):
        return "file not found (removed, or a broken symbolic link)"
    if isinstance(err, OSError) and err.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(err, OSError) and "truncated" in str(err):
        return f"truncated image: {err}"
    if isinstance(err, (UnsupportedImage, FrameError)):
        return str(err)
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _ImageDecoder(torch.utils.data.Dataset):
    """Chunks of items decoded and transformed; a failure becomes (item, None, reason)."""

    def __init__(self, items: Sequence[StreamItem], transform: Transform, chunk: int,
                 max_pixels: int | None, cache: FrameCache | None, draft_side: int | None = None) -> None:
        self.draft_side = draft_side
        self.items = items
        self.transform = transform
        self.chunk = chunk
        self.max_pixels = max_pixels
        self.cache = cache

    def __len__(self) -> int:
        return (len(self.items) + self.chunk - 1) // self.chunk

    def __getitem__(self, index: int) -> Packed:
        start = index * self.chunk
        decoded = [self.decode(item) for item in self.items[start:start + self.chunk]]
        if isinstance(self.transform, ChunkedTransform):
            return pack_finished(decoded, self.transform)
        return pack(decoded)

    def decode(self, item: StreamItem) -> Decoded:
        """The item's image transformed (with a ``ChunkedTransform``: its 8-bit pixels, finished
        with the chunk's), or the reason it could not be read."""
        try:
            if self.cache is not None and item in self.cache:
                return item, self.cache.read(item), None
            kept = self.transform.kept_size if isinstance(self.transform, ChunkedTransform) else None
            pixels = fast_jpeg_pixels(item.path, kept, self.max_pixels) if kept is not None else None
            if pixels is not None:
                return item, pixels, None
            image = read_image(item.path, self.max_pixels, self.draft_side)
            if isinstance(self.transform, ChunkedTransform):
                return item, self.transform.pixels(image), None
            return item, self.transform(image), None
        except Exception as err:  # any unreadable file is skipped, not fatal
            return item, None, describe_error(err, item.path, self.max_pixels)


class _VideoDecoder(torch.utils.data.IterableDataset):
    """One video's selected frames, transformed, in chunks, in frame order."""

    def __init__(self, part: VideoPart, transform: Transform, chunk: int) -> None:
        self.part = part
        self.transform = transform
        self.chunk = chunk

    def __iter__(self) -> Iterator[Packed]:
        p = self.part
        out: list[Decoded] = []
        for item, image, error in iter_frames(p.path, p.key, p.options, p.info, p.label):
            out.append(self._transform(item, image, error))
            if len(out) == self.chunk:
                yield pack(out)
                out = []
        if out:
            yield pack(out)

    def _transform(self, item: StreamItem, image: Image.Image | None, error: str | None) -> Decoded:
        if image is None:
            return item, None, error
        try:
            return item, self.transform(image), None
        except Exception as err:
            return item, None, describe_error(err)


def pack(decoded: list[Decoded]) -> Packed:
    """One tensor for the chunk's images where they share a shape: a worker then hands over one
    shared-memory block per chunk instead of one per image, which costs more than small images do."""
    images = [image for _, image, _ in decoded if image is not None]
    shapes = {tuple(image.shape) for image in images}
    stacked = torch.stack(images) if images and len(shapes) == 1 else images
    return [(item, error) for item, image, error in decoded], stacked


def pack_finished(decoded: list[Decoded], transform: ChunkedTransform) -> Packed:
    """``pack`` for a chunk of 8-bit pixels (and finished tensors: cached frames, images that were
    not 8-bit RGB): the pixels are finished together when they share a shape, else one by one."""
    images = [image for _, image, _ in decoded if image is not None]
    if images and all(image.dtype == torch.uint8 for image in images) and len({i.shape for i in images}) == 1:
        return [(item, error) for item, _, error in decoded], transform.finish(torch.stack(images))
    return pack([(item, transform.finish(image[None])[0] if image is not None and image.dtype == torch.uint8
                  else image, error) for item, image, error in decoded])


def unpack(packed: Packed) -> Iterator[Decoded]:
    entries, images = packed
    position = 0
    for item, error in entries:
        if error is None:
            yield item, images[position], None
            position += 1
        else:
            yield item, None, error


def _chunk_as_is(chunk: Any) -> Any:
    return chunk


def _first(chunk: list[Any]) -> Any:
    return chunk[0]


def _run(dataset: torch.utils.data.Dataset, workers: int) -> Iterator[Decoded]:
    """The dataset's chunks, flattened, from ``workers`` processes (none: in this one)."""
    if workers <= 0:
        yield from (decoded for chunk in _inline(dataset) for decoded in unpack(chunk))
        return
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None if iterable else 1,
        collate_fn=_chunk_as_is if iterable else _first,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=False,
    )
    for chunk in loader:
        yield from unpack(chunk)


def _inline(dataset: torch.utils.data.Dataset) -> Iterator[Packed]:
    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from dataset
    else:
        yield from (dataset[i] for i in range(len(dataset)))  # type: ignore[arg-type]


def decoded_stream(
    source: Stream | Sequence[StreamItem],
    transform: Transform,
    workers: int = 0,
    chunk: int = 16,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    draft_side: int | None = None,
) -> Iterator[Decoded]:
    """(item, image tensor or None, reason) for everything in the stream, in stream order."""
    stream = source if isinstance(source, Stream) else Stream([ImagePart(list(source))])
    for part in stream.parts:
        if isinstance(part, VideoPart):
            # One process per video: its frames must be decoded one after the other anyway.
            yield from _run(_VideoDecoder(part, transform, chunk), min(workers, 1))
        elif part.items:
            dataset = _ImageDecoder(part.items, transform, chunk, max_pixels, stream.cache, draft_side)
            yield from _run(dataset, min(workers, len(dataset)))


def iter_batches(
    source: Stream | Sequence[StreamItem],
    transform: Transform,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool = False,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    draft_side: int | None = None,
    skip_decoded: int = 0,
) -> Iterator[Batch]:
    """Batches of exactly ``batch_size`` decoded images (the last may be smaller), in order;
    ``draft_side``: large JPEGs decoded at reduced scale (``read_image``); ``skip_decoded`` drops the
    first items after decoding (a resumed run inside a video)."""
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

    chunk = min(batch_size, 32)
    for item, image, error in decoded_stream(source, transform, workers, chunk, max_pixels, draft_side):
        if skip_decoded > 0:
            skip_decoded -= 1
            continue
        if image is None:
            skipped.append((item, error or "unreadable"))
            continue
        pending_items.append(item)
        pending_images.append(image)
        if len(pending_items) == batch_size:
            yield flush()
    if pending_items:
        yield flush()
    elif skipped:
        yield Batch([], torch.empty(0), decoded_count, skipped)
