"""Sources: what to adapt on, as an ordered stream, and its decoding into batches.

One module per kind of input (``folder``, ``video``, ``listfile``); :func:`collect_stream` turns
the inputs of a run into one :class:`Stream`, checking every input before any work starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tta_cli.errors import TTAError
from tta_cli.sources.folder import IMAGE_SUFFIXES, folder_items, natural_key
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.labels import LabelMap
from tta_cli.sources.listfile import LIST_SUFFIXES, list_items
from tta_cli.sources.paths import INPUT_KINDS_HINT, check_input
from tta_cli.sources.stream import ImagePart, Part, Stream, VideoPart, merge_parts
from tta_cli.sources.video import VIDEO_SUFFIXES, FrameCache, VideoOptions, probe_video

__all__ = [
    "IMAGE_SUFFIXES", "LIST_SUFFIXES", "VIDEO_SUFFIXES", "Batch", "ImagePart", "LabelMap", "Stream",
    "StreamItem", "VideoOptions", "VideoPart", "collect_stream", "folder_items", "natural_key",
]


def collect_stream(
    inputs: Sequence[Path],
    class_names: list[str],
    labels_csv: Path | None = None,
    video: VideoOptions | None = None,
    shuffle: bool = False,
    seed: int = 0,
    transform: Callable[[Any], Any] | None = None,
    workers: int = 0,
) -> Stream:
    """The inputs, concatenated in the given order (or shuffled together with ``seed``).

    Keys are relative to their input; with several inputs, folder and video keys start with the
    input as given, so they stay unique. Shuffling a stream with videos decodes them first, with
    ``transform``, into a temporary frame cache (close the stream to remove it).
    """
    video = video or VideoOptions()
    video.validate()
    if not inputs:
        raise TTAError("no inputs given", INPUT_KINDS_HINT)
    parts: list[Part] = []
    for path in inputs:
        parts += input_parts(Path(path), class_names, labels_csv, video, prefixed=len(inputs) > 1)
    videos = [p.path for p in parts if isinstance(p, VideoPart)]
    stream = Stream(merge_parts(parts), videos=videos)
    return _shuffled(stream, seed, transform, workers) if shuffle else stream


def input_parts(path: Path, class_names: list[str], labels_csv: Path | None, video: VideoOptions,
                prefixed: bool) -> list[Part]:
    """One input as stream parts: a folder, an image, a video, or a list (of images and videos)."""
    check_input(path)
    name = path.as_posix() if prefixed else path.name
    if path.is_dir():
        items = folder_items(path, class_names, labels_csv)
        if prefixed:
            items = [replace(item, key=f"{name}/{item.key}") for item in items]
        return [ImagePart(items)]
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return [VideoPart(path, name, video, probe_video(path, video))]
    if suffix in LIST_SUFFIXES:
        return [_listed_part(item, video) for item in list_items(path, class_names)]
    if suffix in IMAGE_SUFFIXES:
        return [ImagePart([StreamItem(key=name, path=path)])]
    raise TTAError(f"cannot use {path} as an input: unknown kind of file", INPUT_KINDS_HINT)


def _listed_part(item: StreamItem, video: VideoOptions) -> Part:
    if item.path.suffix.lower() in VIDEO_SUFFIXES:
        check_input(item.path)
        return VideoPart(item.path, item.key, video, probe_video(item.path, video), item.label)
    return ImagePart([item])


def _shuffled(stream: Stream, seed: int, transform: Callable[[Any], Any] | None, workers: int) -> Stream:
    """Every item in one random order; videos' frames come from a cache decoded here, in order."""
    from tta_cli.sources.loader import decoded_stream

    items: list[StreamItem] = []
    cache = None
    for part in stream.parts:
        if isinstance(part, ImagePart):
            items += part.items
            continue
        if transform is None:
            raise ValueError("shuffling a stream with videos needs the model's transform")
        cache = cache or FrameCache()
        decoded = decoded_stream(Stream([part]), transform, workers)
        items += [cache.add(item, tensor, error) for item, tensor, error in decoded]
    if cache is not None:
        cache.finish()
    random.Random(seed).shuffle(items)
    return Stream([ImagePart(items)], cache, shuffled=True, videos=stream.videos)
