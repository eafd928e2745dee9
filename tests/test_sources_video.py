"""Video sources: probing, frame selection, keys and times, damaged files, decoding like folders."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.helpers import VIDEO_CODECS, write_video
from tests.helpers import resize_to_tensor as to_tensor
from tta_cli.cli import main
from tta_cli.errors import TTAError
from tta_cli.sources import Stream, VideoPart, collect_stream
from tta_cli.sources.loader import iter_batches
from tta_cli.sources.video import FrameSelector, VideoOptions, decode_threads, iter_frames, probe_video

pytestmark = pytest.mark.usefixtures("one_thread")


def frames(path: Path, **options: float) -> list[int]:
    opts = VideoOptions(**options)  # type: ignore[arg-type]
    return [item.frame for item, image, _ in iter_frames(path, path.name, opts) if image is not None]


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return write_video(tmp_path / "clip.mp4")


@pytest.mark.parametrize("suffix", sorted(VIDEO_CODECS))
def test_every_container_gives_every_frame_in_order(tmp_path: Path, suffix: str) -> None:
    path = write_video(tmp_path / f"clip{suffix}")
    decoded = list(iter_frames(path, path.name, VideoOptions()))
    assert [item.frame for item, _, _ in decoded] == list(range(30))
    assert [item.timestamp for item, _, _ in decoded] == pytest.approx([i / 10 for i in range(30)])
    levels = [float(np.asarray(image).mean()) for _, image, _ in decoded]
    assert levels == pytest.approx([8 * i for i in range(30)], abs=4)


def test_keys_name_the_clip_and_frame(clip: Path) -> None:
    item, _, error = next(iter_frames(clip, "clip.mp4", VideoOptions(every=7), label=3))
    assert (item.key, item.frame, item.label, error) == ("clip.mp4#frame=000000", 0, 3, None)
    keys = [item.key for item, _, _ in iter_frames(clip, "clip.mp4", VideoOptions(every=7))]
    assert keys[1:] == ["clip.mp4#frame=000007", "clip.mp4#frame=000014", "clip.mp4#frame=000021",
                        "clip.mp4#frame=000028"]


def test_probe_reads_the_header(clip: Path) -> None:
    info = probe_video(clip, VideoOptions())
    assert (info.frames, info.rate, info.width, info.height) == (30, 10.0, 64, 48)
    assert info.duration == pytest.approx(3.0)


@pytest.mark.parametrize(("options", "expected"), [
    ({"every": 4}, [0, 4, 8, 12, 16, 20, 24, 28]),
    ({"fps": 5}, list(range(0, 30, 2))),
    ({"fps": 3}, [0, 4, 7, 10, 14, 17, 20, 24, 27]),
    ({"fps": 100}, list(range(30))),  # never repeats a frame
    ({"start": 1.0, "end": 2.0}, list(range(10, 20))),
    ({"start": 1.0, "every": 3}, list(range(10, 30, 3))),
    ({"max_frames": 5}, [0, 1, 2, 3, 4]),
    ({"fps": 2, "start": 0.5, "max_frames": 3}, [5, 10, 15]),
])
def test_frame_selection(clip: Path, options: dict[str, float], expected: list[int]) -> None:
    assert frames(clip, **options) == expected
    assert frames(clip, **options) == expected  # the same on every run
    estimate = probe_video(clip, VideoOptions(**options)).estimate(VideoOptions(**options))  # type: ignore[arg-type]
    assert estimate == len(expected)


def test_selector_without_timestamps_counts_frames() -> None:
    selector = FrameSelector(VideoOptions(every=2))
    assert [selector.keep(None) for _ in range(5)] == [True, False, True, False, True]


@pytest.mark.parametrize(("options", "message"), [
    ({"every": 2, "fps": 1.0}, "cannot be used together"),
    ({"every": 0}, "--every"),
    ({"fps": 0.0}, "--fps"),
    ({"start": -1.0}, "--start"),
    ({"start": 2.0, "end": 1.0}, "--end"),
    ({"max_frames": 0}, "--max-frames"),
])
def test_bad_options_are_refused(options: dict[str, float], message: str) -> None:
    with pytest.raises(TTAError, match=message):
        VideoOptions(**options).validate()  # type: ignore[arg-type]


def test_start_past_the_end_is_an_input_error(clip: Path) -> None:
    with pytest.raises(TTAError, match=r"past the end of .*clip.mp4"):
        probe_video(clip, VideoOptions(start=5.0))


@pytest.mark.parametrize(("content", "message"), [
    (b"", "cannot read video"),
    (b"this is not a video at all", "cannot read video"),
])
def test_unreadable_videos_are_input_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(TTAError, match=message) as err:
        probe_video(path, VideoOptions())
    assert str(path) in str(err.value) and err.value.hint


def test_truncated_mp4_without_index_is_an_input_error(tmp_path: Path) -> None:
    data = write_video(tmp_path / "full.mp4", n=60, size=(160, 120)).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: nothing is playable
    with pytest.raises(TTAError, match="cannot read video"):
        probe_video(cut, VideoOptions())


def test_audio_only_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "sound.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(TTAError, match="no video stream"):
        probe_video(path, VideoOptions())


def test_truncated_video_keeps_its_frames_and_reports_the_cut(tmp_path: Path) -> None:
    data = write_video(tmp_path / "full.mkv", n=100, size=(160, 120)).read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    info = probe_video(cut, VideoOptions())
    decoded = list(iter_frames(cut, "cut.mkv", VideoOptions(), info))
    good = [item.frame for item, image, _ in decoded if image is not None]
    assert good == list(range(len(good))) and 10 < len(good) < 100
    errors = [(item.key, reason) for item, image, reason in decoded if image is None]
    assert errors and "truncated" in errors[-1][1]


def test_corrupt_data_in_the_middle_becomes_error_rows(tmp_path: Path) -> None:
    data = bytearray(write_video(tmp_path / "full.mkv", n=100, size=(160, 120)).read_bytes())
    rng = np.random.default_rng(0)
    middle = len(data) // 3
    data[middle:middle + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    decoded = list(iter_frames(bad, "bad.mkv", VideoOptions(), probe_video(bad, VideoOptions())))
    good = [item.frame for item, image, _ in decoded if image is not None]
    assert good[:10] == list(range(10))
    assert any(image is None and "bad.mkv" in item.key for item, image, _ in decoded)


def test_frames_decode_exactly_like_the_same_images_in_a_folder(clip: Path, tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for item, image, _ in iter_frames(clip, "clip.mp4", VideoOptions(every=3)):
        image.save(folder / f"{item.frame:03d}.png")  # lossless: the very pixels of the frame
    stream = collect_stream([clip], [], video=VideoOptions(every=3))
    from_video = [b for b in iter_batches(stream, to_tensor, batch_size=4)]
    from_folder = list(iter_batches(collect_stream([folder], []), to_tensor, batch_size=4))
    assert [len(b.items) for b in from_video] == [4, 4, 2]
    assert torch.equal(torch.cat([b.images for b in from_video]), torch.cat([b.images for b in from_folder]))
    assert [i.timestamp for b in from_video for i in b.items] == pytest.approx([0.3 * k for k in range(10)])


def test_worker_process_decodes_the_same_stream(clip: Path, tmp_path: Path) -> None:
    from tests.conftest import make_images

    make_images(tmp_path / "a", 5)
    stream = collect_stream([tmp_path / "a", clip, tmp_path / "a"], [], video=VideoOptions(every=2))
    assert isinstance(stream.parts[1], VideoPart) and stream.total == 25
    inline = list(iter_batches(stream, to_tensor, batch_size=8, workers=0))
    pooled = list(iter_batches(stream, to_tensor, batch_size=8, workers=2))
    keys = [i.key for b in inline for i in b.items]
    assert keys == [i.key for b in pooled for i in b.items]
    assert keys[5:8] == [f"{clip.as_posix()}#frame=000000", f"{clip.as_posix()}#frame=000002",
                         f"{clip.as_posix()}#frame=000004"]
    assert torch.equal(torch.cat([b.images for b in inline]), torch.cat([b.images for b in pooled]))


class _DecodeThreads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> str:
        return decode_threads()


def test_a_loader_worker_decodes_video_in_one_thread() -> None:
    """Frame threads in the main process; none in a forked worker, where they can deadlock."""
    assert decode_threads() == "AUTO"
    loader = torch.utils.data.DataLoader(_DecodeThreads(), batch_size=None, num_workers=1)
    assert list(loader) == ["NONE"]


@pytest.mark.parametrize("workers", [0, 1])
def test_shuffled_stream_with_video_uses_the_same_frames(clip: Path, tmp_path: Path, workers: int) -> None:
    from tests.conftest import make_images

    make_images(tmp_path / "a", 6)
    inputs = [tmp_path / "a", clip]
    plain = {i.key: img for b in iter_batches(collect_stream(inputs, [], video=VideoOptions(every=5)),
                                              to_tensor, 4) for i, img in zip(b.items, b.images, strict=True)}
    orders = []
    for _ in range(2):
        stream = collect_stream(inputs, [], video=VideoOptions(every=5), shuffle=True, seed=3,
                                transform=to_tensor, workers=workers)
        assert stream.cache is not None and stream.cache.file.exists()
        batches = list(iter_batches(stream, to_tensor, 4, workers=workers))
        orders.append([i.key for b in batches for i in b.items])
        for b in batches:
            for item, image in zip(b.items, b.images, strict=True):
                assert torch.equal(image, plain[item.key])
        stream.close()
        assert not stream.cache.file.exists()
    assert orders[0] == orders[1] and sorted(orders[0]) == sorted(plain) and orders[0] != list(plain)


def test_shuffled_stream_without_transform_is_refused(clip: Path) -> None:
    with pytest.raises(ValueError, match="transform"):
        collect_stream([clip], [], shuffle=True)


def test_cli_adapts_on_a_video(clip: Path, tmp_path: Path, tiny_model_dir: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    argv = ["tta", "adapt", str(clip), "-m", f"local-dir:{tiny_model_dir}", "-o", str(out), "-b", "4",
            "--fps", "5", "--start", "1", "--workers", "0", "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("index,path,frame,timestamp")
    assert [r.split(",")[1:4] for r in rows[1:4]] == [
        ["clip.mp4#frame=000010", "10", "1.000"], ["clip.mp4#frame=000012", "12", "1.200"],
        ["clip.mp4#frame=000014", "14", "1.400"]]
    assert len(rows) == 1 + 10
    assert not (out / "errors.csv").exists()


def test_stream_describes_videos(clip: Path) -> None:
    stream = collect_stream([clip], [], video=VideoOptions(every=2))
    assert isinstance(stream, Stream) and stream.describe() == "0 images and ~15 frames of 1 videos, labels: none"
