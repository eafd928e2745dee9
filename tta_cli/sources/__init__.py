"""Sources: what to adapt on, as an ordered stream, and its decoding into batches.

One module per kind of input (``folder``, ``video``, ``listfile``); :func:`collect_stream` turns
the inputs of a run into one :class:`Stream`, checking every input before any work starts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tta_cli.errors import TTAError
from tta_cli.sources.folder import IMAGE_SUFFIXES, folder_items, labelled_folder, natural_key
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.labels import DEFAULT_ENCODING, FROM_LIST, NO_LABELS, LabelMap
from tta_cli.sources.listfile import LIST_SUFFIXES, list_items
from tta_cli.sources.paths import INPUT_KINDS_HINT, check_input
from tta_cli.sources.stream import ImagePart, Part, Stream, VideoPart, merge_parts
from tta_cli.sources.video import VIDEO_SUFFIXES, FrameCache, VideoOptions, probe_video

__all__ = [
    "IMAGE_SUFFIXES", "LIST_SUFFIXES", "VIDEO_SUFFIXES", "Batch", "ImagePart", "LabelMap", "Labelling", "Stream",
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
    labels_encoding: str = DEFAULT_ENCODING,
    labels_from_folders: str = "auto",
) -> Stream:
    """The inputs, concatenated in the given order (or shuffled together with ``seed``).

    Keys are relative to their input; with several inputs, folder and video keys start with the
    input as given, so they stay unique. Shuffling a stream with videos decodes them first, with
    ``transform``, into a temporary frame cache (close the stream to remove it). The stream says
    where each input's labels came from (:attr:`Stream.labels_from`).
    """
    video = video or VideoOptions()
    video.validate()
    if not inputs:
        raise TTAError("no inputs given", INPUT_KINDS_HINT)
    labelling = Labelling(class_names, labels_csv, labels_encoding, labels_from_folders)
    parts: list[Part] = []
    labels_from: dict[str, str] = {}
    notes: list[str] = []
    for path in inputs:
        found, source, note = input_parts(Path(path), labelling, video, prefixed=len(inputs) > 1)
        parts += found
        labels_from[str(path)] = source
        notes += [f"{path}: {note}"] if note else []
    videos = [p.path for p in parts if isinstance(p, VideoPart)]
    stream = Stream(merge_parts(parts), videos=videos, labels_from=labels_from, label_notes=notes)
    return _shuffled(stream, seed, transform, workers) if shuffle else stream


@dataclass(frozen=True)
class Labelling:
    """How the inputs get their labels (``--labels``, ``--labels-encoding``, ``--labels-from-folders``)."""

    class_names: list[str]
    labels_csv: Path | None = None
    encoding: str = DEFAULT_ENCODING
    from_folders: str = "auto"


def input_parts(path: Path, labelling: Labelling, video: VideoOptions,
                prefixed: bool) -> tuple[list[Part], str, str | None]:
    """One input as stream parts (a folder, an image, a video, or a list of images and videos),
    where its labels came from, and a note on why a folder's sub-folders are not labels."""
    check_input(path)
    name = path.as_posix() if prefixed else path.name
    if path.is_dir():
        found = labelled_folder(path, labelling.class_names, labelling.labels_csv, labelling.encoding,
                                labelling.from_folders)
        items = found.items
        if prefixed:
            items = [replace(item, key=f"{name}/{item.key}") for item in items]
        return [ImagePart(items)], found.labels_from, found.note
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return [VideoPart(path, name, video, probe_video(path, video))], NO_LABELS, None
    if suffix in LIST_SUFFIXES:
        listed = list_items(path, labelling.class_names, labelling.encoding)
        source = FROM_LIST if any(item.label is not None for item in listed) else NO_LABELS
        return [_listed_part(item, video) for item in listed], source, None
    if suffix in IMAGE_SUFFIXES:
        return [ImagePart([StreamItem(key=name, path=path)])], NO_LABELS, None
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
    return Stream([ImagePart(items)], cache, shuffled=True, videos=stream.videos,
                  labels_from=stream.labels_from, label_notes=stream.label_notes)
