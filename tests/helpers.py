"""Helpers shared by the test files: generated images and videos, tiny timm models, CSV readers
and the CLI runner. Fixtures built on them live in ``conftest.py``."""

from __future__ import annotations

import csv
import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tta_cli.methods import create_method
from tta_cli.methods.base import TTAMethod, softmax_entropy
from tta_cli.outputs import BatchOutputs

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
"""CIFAR-10's class names: the label names of the tiny test models."""

VIDEO_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "mpeg4", ".webm": "libvpx-vp9"}


def make_images(folder: Path, n: int, size: int = 32, prefix: str = "img", seed: int = 0,
                suffix: str = ".png") -> list[Path]:
    """``n`` random RGB images ``prefix0 .. prefix{n-1}`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def make_class_folders(root: Path, per_class: int = 2, classes: Sequence[str] = CLASSES) -> Path:
    """A class-foldered set ``root/<class>/img<i>.png``, each class from its own seed."""
    for i, name in enumerate(classes):
        make_images(root / name, per_class, seed=i)
    return root


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` pixels in a few bytes, as a decompression bomb does."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_video(path: Path, n: int = 30, rate: int = 10, size: tuple[int, int] = (64, 48),
                options: dict[str, str] | None = None) -> Path:
    """``n`` frames of flat grey, frame i at level 8*i, so decoded frames can be told apart."""
    import av

    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(VIDEO_CODECS[path.suffix], rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.bit_rate = 4_000_000  # near-lossless, so the frame levels survive
        for i in range(n):
            pixels = np.full((size[1], size[0], 3), (8 * i) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def resize_to_tensor(image: Image.Image, size: int = 32) -> torch.Tensor:
    """A stand-in for a model's transform: any image to 3 x size x size in [0, 1]."""
    pixels = np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return torch.from_numpy(pixels).permute(2, 0, 1) / 255


def tiny_timm(arch: str = "test_vit", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A random-weight timm test model for 32 px inputs (the same weights for the same seed)."""
    import timm

    torch.manual_seed(seed)
    kwargs = {"img_size": 32} if arch == "test_vit" else {}
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def random_inputs(n_batches: int = 3, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """Batches of 3 x 32 x 32 noise, wide enough that random models disagree across samples."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) * 2 for _ in range(n_batches)]


def save_timm_folder(model: torch.nn.Module, folder: Path, label_names: list[str] | None = None) -> Path:
    """Save a timm model as a local-dir folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, str(folder / "config.json"),
                       model_config={"label_names": label_names} if label_names else None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def tiny_model_folder(folder: Path, arch: str = "test_vit") -> Path:
    """A tiny 10-class model with CIFAR-10 names at 32 px and no crop, as a local-dir folder."""
    model = tiny_timm(arch)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32), "crop_pct": 1.0}
    return save_timm_folder(model, folder, CLASSES)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def compare_predictions(predictions: Path, reference: Path) -> tuple[float, float, float]:
    """(share of predictions identical to the reference's, our accuracy, the reference's), after
    checking that both list the same images in the same order (the fidelity tests)."""
    ours, theirs = csv_rows(predictions), csv_rows(reference)
    assert [r["path"] for r in ours] == [r["file"] for r in theirs]
    same = sum(a["pred"] == b["pred"] for a, b in zip(ours, theirs, strict=True)) / len(theirs)
    accuracy = sum(r["pred"] == r["label"] for r in ours) / len(ours)
    return same, accuracy, sum(r["pred"] == r["label"] for r in theirs) / len(theirs)


def invoke(*args: str | Path):
    """Run ``tta ARGS`` in-process through Typer's CliRunner."""
    from typer.testing import CliRunner

    from tta_cli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def half_reliable_margin(arch: str, stream: list[torch.Tensor]) -> float:
    """A margin factor that makes about half of the samples reliable on the source model, so that
    the filters select some samples and not others (random models are uncertain everywhere)."""
    with torch.no_grad():
        entropy = torch.cat([softmax_entropy(tiny_timm(arch).eval()(x)) for x in stream])
    return float(entropy.median()) / math.log(10) + 1e-6


def run_method(name: str, arch: str, stream: list[torch.Tensor], reads_free: bool = True,
               **config: object) -> tuple[TTAMethod, list[torch.Tensor], list[torch.Tensor]]:
    """The method over the stream (lr 0.05): the method, the logits and the used masks per batch.

    ``reads_free=False`` is what a GPU run does: decide on the device, never read a count back.
    """
    method = create_method(name, tiny_timm(arch), batch_size=stream[0].shape[0], lr=0.05, **config)
    if not reads_free:
        method.reads_are_free = lambda tensor: False  # type: ignore[method-assign]
    logits, used = [], []
    for x in stream:
        result = method.step(x)
        logits.append(result.logits)
        used.append(result.used)
    return method, logits, used


def max_param_diff(a: TTAMethod, b: TTAMethod) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.params, b.params, strict=True))


class Recorder:
    """A sink that keeps every batch's outputs, in order."""

    def __init__(self) -> None:
        self.outputs: list[BatchOutputs] = []

    def on_batch(self, outputs: BatchOutputs) -> None:
        self.outputs.append(outputs)
