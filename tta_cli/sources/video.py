"""Video files: probed up front, then decoded with PyAV in one sequential pass, frames in order.

A frame's number is its position among the decoded frames (0-based), found by counting from the
first frame: there is no seeking, so the numbers and the selection (``--every``, ``--fps``,
``--start``, ``--end``, ``--max-frames``) are the same on every run and for every container.
Undecodable data in the middle of a video, or a video that ends before its header says, becomes
a row of ``errors.csv``; a video that cannot be opened at all is an input error, found before the run.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tta_cli.errors import TTAError
from tta_cli.sources.items import StreamItem

if TYPE_CHECKING:
    import torch
    from PIL import Image

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm"})
MAX_BAD_PACKETS = 100
"""Consecutive undecodable packets after which the rest of a video is given up."""
_EPS = 1e-6  # seconds; frame times are exact fractions, float rounding is far below this
_CORRUPT_HINT = "the file is corrupt, truncated or not a video: check it with ffprobe, or re-encode it"


@dataclass(frozen=True)
class VideoOptions:
    """Which frames of each video enter the stream."""

    every: int | None = None
    """Keep every N-th frame (counted from the first frame at or after ``start``)."""
    fps: float | None = None
    """Keep at most this many frames per second: the first frame at or after each 1/fps tick."""
    start: float = 0.0
    end: float | None = None
    max_frames: int | None = None
    """At most this many frames from each video."""

    def validate(self) -> None:
        if self.every is not None and self.fps is not None:
            raise TTAError("--every and --fps cannot be used together", "pick one way to thin out frames")
        if self.every is not None and self.every < 1:
            raise TTAError(f"--every must be at least 1, got {self.every}")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise TTAError(f"--fps must be a positive number, got {self.fps}")
        if not (self.start >= 0 and math.isfinite(self.start)):
            raise TTAError(f"--start must be a time in seconds >= 0, got {self.start}")
        if self.end is not None and not self.end > self.start:
            raise TTAError(f"--end ({self.end} s) must be after --start ({self.start} s)")
        if self.max_frames is not None and self.max_frames < 1:
            raise TTAError(f"--max-frames must be at least 1, got {self.max_frames}")

    @property
    def needs_time(self) -> bool:
        return self.fps is not None or self.start > 0 or self.end is not None


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says (any of it may be missing)."""

    frames: int | None
    rate: float | None
    """Average frames per second."""
    duration: float | None
    """Seconds, of the video stream (or of the file when it holds nothing else)."""
    width: int
    height: int

    def estimate(self, options: VideoOptions) -> int | None:
        """About how many frames the options select: for the progress bar only."""
        if self.rate is None or (self.duration is None and self.frames is None):
            return None
        duration = self.duration if self.duration is not None else (self.frames or 0) / self.rate
        window = max(0.0, min(duration, options.end or duration) - options.start)
        count = math.ceil(window * self.rate - _EPS)
        if options.every is not None:
            count = math.ceil(count / options.every)
        if options.fps is not None:
            count = min(count, math.ceil(window * options.fps - _EPS))
        if options.max_frames is not None:
            count = min(count, options.max_frames)
        return count


def frame_key(key: str, index: int) -> str:
    return f"{key}#frame={index:06d}"


def _open(path: Path) -> Any:
    """``av.open`` with PyAV's errors turned into input errors that name the file."""
    import av

    try:
        return av.open(str(path), metadata_errors="ignore")
    except FileNotFoundError:
        raise TTAError(f"input not found: {path}") from None
    except PermissionError:
        raise TTAError(f"cannot read {path}: permission denied", "check its permissions") from None
    except (av.error.FFmpegError, OSError) as err:
        raise TTAError(f"cannot read video {path}: {_reason(err)}", _CORRUPT_HINT) from None


def _reason(err: BaseException) -> str:
    import av

    if isinstance(err, av.error.FFmpegError) and err.strerror:
        return str(err.strerror)
    return str(err) or type(err).__name__


def probe_video(path: Path, options: VideoOptions) -> VideoInfo:
    """Open ``path`` and decode its first frame; raise a :class:`TTAError` if that is not possible."""
    import av

    container = _open(path)
    with container:
        if not container.streams.video:
            raise TTAError(f"no video stream in {path}", "give a file with a video track")
        stream = container.streams.video[0]
        try:
            first = next(iter(container.decode(stream)), None)
        except (av.error.FFmpegError, OSError) as err:
            raise TTAError(f"cannot decode video {path}: {_reason(err)}", _CORRUPT_HINT) from None
        if first is None:
            raise TTAError(f"no decodable frames in {path}", _CORRUPT_HINT)
        info = _info(container, stream)
    if options.needs_time and first.pts is None and info.rate is None:
        raise TTAError(f"{path} has no frame timestamps", "--fps, --start and --end need them; use --every")
    if info.duration is not None and options.start >= info.duration:
        raise TTAError(f"--start {options.start} s is past the end of {path} ({info.duration:.2f} s)")
    return info


def _info(container: Any, stream: Any) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    duration = None
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:
        # The container's duration covers every stream; only trust it when there is no other.
        duration = container.duration / 1_000_000
    return VideoInfo(
        frames=stream.frames or None,
        rate=float(rate) if rate else None,
        duration=duration,
        width=stream.codec_context.width,
        height=stream.codec_context.height,
    )


class FrameSelector:
    """Decides, frame by frame in decoding order, which frames to keep and when to stop."""

    def __init__(self, options: VideoOptions) -> None:
        self.options = options
        self.seen = 0  # frames at or after --start
        self.kept = 0
        self.next_tick = options.start

    def past_end(self, time: float | None) -> bool:
        o = self.options
        if o.max_frames is not None and self.kept >= o.max_frames:
            return True
        return o.end is not None and time is not None and time >= o.end - _EPS

    def keep(self, time: float | None) -> bool:
        o = self.options
        if time is not None and time < o.start - _EPS:
            return False
        self.seen += 1
        if o.every is not None:
            chosen = (self.seen - 1) % o.every == 0
        elif o.fps is not None and time is not None:
            chosen = time >= self.next_tick - _EPS
            if chosen:  # the next tick after this frame: --fps never repeats a frame
                self.next_tick = o.start + (math.floor((time - o.start) * o.fps + _EPS) + 1) / o.fps
        else:
            chosen = True
        self.kept += int(chosen)
        return chosen


@dataclass
class _Clock:
    """Frame times in seconds from the start of the stream; from the frame rate without timestamps."""

    origin: int | None
    time_base: Fraction | None
    rate: float | None

    def time(self, pts: int | None, index: int) -> float | None:
        if pts is not None and self.time_base is not None:
            if self.origin is None:
                self.origin = pts
            return float((pts - self.origin) * self.time_base)
        return index / self.rate if self.rate else None


Frame = tuple[StreamItem, "Image.Image | None", "str | None"]


class _Errors:
    """Runs of undecodable packets, merged into one ``errors.csv`` row each."""

    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def add(self, reason: str) -> None:
        self.first = self.first or reason
        self.count += 1

    def flush(self, key: str, path: Path, index: int) -> Frame | None:
        if not self.count:
            return None
        what = "1 undecodable packet" if self.count == 1 else f"{self.count} undecodable packets"
        reason = f"corrupt video data before this frame ({what}): {self.first}"
        row = (StreamItem(frame_key(key, index), path), None, reason)
        self.count, self.first = 0, ""
        return row


def decode_threads() -> str:
    """FFmpeg's threading for a decoder: frame threads (AUTO: faster, and bit-exact for the codecs
    FFmpeg ships) in the main process, none in a loader worker (a forked process, already one of
    several decoding lanes). The conversion to RGB (``to_image(threads=1)``) never uses swscale's
    slice threads: a forked worker that inherited a threaded scaler from the main process waited
    forever for threads that do not exist in it (seen in CI, in ``avpriv_slicethread_execute``)."""
    import torch.utils.data

    return "NONE" if torch.utils.data.get_worker_info() is not None else "AUTO"


def iter_frames(path: Path, key: str, options: VideoOptions, info: VideoInfo | None = None,
                label: int | None = None) -> Iterator[Frame]:
    """(item, RGB image, None) per selected frame, or (item, None, reason) for what could not be read."""
    import av

    try:
        container = _open(path)
    except TTAError as err:  # it opened when probed: changed or removed since
        yield StreamItem(key, path), None, err.message
        return
    with container:
        stream = container.streams.video[0]
        stream.thread_type = decode_threads()
        start = stream.start_time if stream.start_time is not None else None
        clock = _Clock(start, stream.time_base, float(stream.average_rate) if stream.average_rate else None)
        selector, errors = FrameSelector(options), _Errors()
        index, last_time, stopped = 0, None, False
        for packet in _packets(container, stream, errors):
            try:
                frames = stream.decode(packet)
            except (av.error.FFmpegError, OSError) as err:
                errors.add(_reason(err))
                if errors.count >= MAX_BAD_PACKETS:
                    yield StreamItem(frame_key(key, index), path), None, (
                        f"gave up on the rest of the video after {MAX_BAD_PACKETS} undecodable packets")
                    return
                continue
            for frame in frames:
                row = errors.flush(key, path, index)
                if row:
                    yield row
                last_time = time = clock.time(frame.pts, index)
                if selector.past_end(time):
                    stopped = True
                    break
                if selector.keep(time):
                    item = StreamItem(frame_key(key, index), path, label, index, time)
                    yield item, frame.to_image(threads=1), None
                index += 1
            if stopped:
                break
        row = errors.flush(key, path, index)
        if row:
            yield row
    if not stopped and info is not None:
        yield from _truncation(path, key, info, last_time)


def _packets(container: Any, stream: Any, errors: _Errors) -> Iterator[Any]:
    """The stream's packets; a container that cannot be read further ends it (noted as an error)."""
    import av

    packets = container.demux(stream)
    while True:
        try:
            yield next(packets)
        except StopIteration:
            return
        except (av.error.FFmpegError, OSError) as err:
            errors.add(f"unreadable container data: {_reason(err)}")
            return


def _truncation(path: Path, key: str, info: VideoInfo, last_time: float | None) -> Iterator[Frame]:
    """A row when the video stops well before its header's duration (a cut-off download, say)."""
    if info.duration is None or last_time is None:
        return
    frame = 1 / info.rate if info.rate else 0.0
    missing = info.duration - last_time - frame
    if missing > max(0.5, 2 * frame, 0.02 * info.duration):
        yield StreamItem(key, path), None, (
            f"video ends at {last_time:.2f} s but its header says {info.duration:.2f} s (truncated file?)")


class FrameError(Exception):
    """A video frame of a shuffled stream that could not be decoded (the reason is the message)."""


class FrameCache:
    """Preprocessed frames of the videos of a shuffled stream, in a temporary file.

    Shuffling needs any frame at any time, and seeking is neither exact nor cheap; so the videos
    are decoded once, in order, before the run, and each frame's tensor stored as one float row.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="tta-frames-")  # removed on close or exit
        self.file = Path(self._dir.name) / "frames.f32"
        self._handle: Any = self.file.open("wb")
        self._rows: dict[StreamItem, int | str] = {}
        self.shape: tuple[int, ...] | None = None
        self.count = 0
        self._map: Any = None

    def add(self, item: StreamItem, tensor: torch.Tensor | None, error: str | None) -> StreamItem:
        if tensor is None:
            self._rows[item] = error or "unreadable frame"
            return item
        tensor = tensor.float().contiguous()
        if self.shape is None:
            self.shape = tuple(tensor.shape)
        self._handle.write(tensor.numpy().tobytes())
        self._rows[item] = self.count
        self.count += 1
        return item

    def finish(self) -> None:
        self._handle.close()

    def __contains__(self, item: StreamItem) -> bool:
        return item in self._rows

    def read(self, item: StreamItem) -> torch.Tensor:
        import numpy as np
        import torch

        entry = self._rows[item]
        if isinstance(entry, str):
            raise FrameError(entry)
        if self._map is None:
            shape = (self.count, *(self.shape or ()))
            self._map = np.memmap(self.file, dtype=np.float32, mode="r", shape=shape)
        return torch.from_numpy(np.array(self._map[entry]))

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes get the index, and open the file themselves.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_handle", "_dir")}
        return state | {"_map": None}

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self._map = None
        self._dir.cleanup()
