#!/usr/bin/env python3
"""Build the small, committed sample data set in ``sample_data/``.

The project's examples, documentation and quick tests need a real image stream and a real model
without the (large, not redistributed) ``../shared`` folder. This script makes both from ``shared``
and rebuilds them from scratch each time it runs:

``<out>/stream/``
    ``--n`` (320) CIFAR-10 *test* images, drawn with ``--seed`` from
    ``shared/data/cifar10-jpeg.tar.gz``, each corrupted at severity 5 by one of the 15 ImageNet-C
    corruptions (chosen per image with the seed) using the ``corrupt-tta`` package: a mixed-shift
    stream. A flat folder of PNG files whose names give the stream order (``0000.png``, ...), plus
    ``labels.csv`` with the header ``file,label,class,corruption`` (``label`` is the class index in
    the standard CIFAR-10 order).

``<out>/model/``
    A timm model folder (``config.json`` + ``model.safetensors``) that is the float16 copy of
    ``shared/models/cifar10-convnext-atto-ln``: the same ``config.json`` (plus a ``derived_from``
    note) with every floating tensor stored as float16, which halves its size. timm casts the
    tensors back into the float32 model when it loads the folder.

``<out>/README.md``
    What is there, the command that made it, the accuracies measured below and a licence note.

After building, the script checks that ``timm.create_model("local-dir:<out>/model",
pretrained=True)`` loads the float16 copy strictly, and compares its top-1 accuracy on the stream
with that of the float32 original (the model's own preprocessing in both cases).

Determinism: the sample is drawn with ``random.Random(seed)``, and numpy's global generator is
re-seeded from ``(seed, index)`` before each image is corrupted, since most corruptions draw their
noise from ``np.random``. ``impulse_noise`` is the exception: it calls scikit-image's
``random_noise`` without a generator, so it would differ on every run; while corrupting, that call
is wrapped to pass a generator seeded from ``np.random``.

usage: python sample_data/make_sample_data.py [--shared DIR] [--out DIR] [--n 320] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_MODEL = "models/cifar10-convnext-atto-ln"
CIFAR_TAR = "data/cifar10-jpeg.tar.gz"
SEVERITY = 5
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CORRUPTIONS = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]


def default_shared() -> Path:
    """``$TTA_SHARED`` if set, else ``../shared`` next to the repository root."""
    env = os.environ.get("TTA_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def read_cifar_test(tar_path: Path) -> list[tuple[str, int, bytes]]:
    """All CIFAR-10 test images as ``(member name, label, JPEG bytes)``, sorted by member name.

    Sorting makes the later seeded draw independent of the order of the members in the archive.
    """
    items: list[tuple[str, int, bytes]] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] == "test" and parts[2] in CLASSES:
                fobj = tar.extractfile(member)
                assert fobj is not None
                items.append((member.name, CLASSES.index(parts[2]), fobj.read()))
    if not items:
        raise SystemExit(f"no cifar10/test/<class>/*.jpg members found in {tar_path}")
    items.sort(key=lambda item: item[0])
    return items


def make_stream(shared: Path, out_dir: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Write ``n`` corrupted test images and ``labels.csv`` to ``out_dir``; return the rows."""
    import corrupt_tta

    from tta_cli.bench.corrupt import seeded_impulse_noise

    items = read_cifar_test(shared / CIFAR_TAR)
    if not 0 < n <= len(items):
        raise SystemExit(f"--n must be in 1..{len(items)}, got {n}")
    rng = random.Random(seed)
    chosen = rng.sample(items, n)
    corruptions = [rng.choice(CORRUPTIONS) for _ in chosen]
    width = max(4, len(str(n - 1)))
    out_dir.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    with seeded_impulse_noise(corrupt_tta):
        for index, ((_, label, data), corruption) in enumerate(zip(chosen, corruptions, strict=True)):
            np.random.seed([seed, index])
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            corrupted = corrupt_tta.corrupt(img, severity=SEVERITY, corruption_name=corruption)
            img = np.clip(np.asarray(corrupted), 0, 255).astype(np.uint8)
            name = f"{index:0{width}d}.png"
            Image.fromarray(img).save(out_dir / name)
            rows.append({"file": name, "label": label, "class": CLASSES[label], "corruption": corruption})
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "class", "corruption"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def make_model(shared: Path, out_dir: Path) -> None:
    """Write the float16 copy of the shared ConvNeXt-Atto model folder to ``out_dir``."""
    import torch
    from safetensors.torch import load_file, save_file

    src = shared / SOURCE_MODEL
    config = json.loads((src / "config.json").read_text())
    config["derived_from"] = (
        f"float16 copy of shared/{SOURCE_MODEL} (same config; every floating tensor of "
        "model.safetensors stored as float16), made by sample_data/make_sample_data.py"
    )
    tensors = load_file(src / "model.safetensors")
    half = {
        key: (t.to(torch.float16) if t.is_floating_point() else t).contiguous() for key, t in tensors.items()
    }
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(half, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)  # save_file creates it private (0600)


def check_loaded(model: Any, weights: Path) -> None:
    """Fail unless ``model`` holds exactly the tensors of ``weights`` (same keys, float32, equal values).

    timm loads strictly by default but may quietly relax that (e.g. on a class-count mismatch), so the
    float16 file is checked against the loaded float32 model directly.
    """
    import torch
    from safetensors.torch import load_file

    stored = load_file(weights)
    state = model.state_dict()
    if set(stored) != set(state):
        raise SystemExit(f"{weights}: keys differ from the model's: {sorted(set(stored) ^ set(state))[:5]}")
    for key, tensor in stored.items():
        loaded = state[key]
        if tensor.is_floating_point() and loaded.dtype != torch.float32:
            raise SystemExit(f"{key}: loaded as {loaded.dtype}, expected float32")
        if loaded.shape != tensor.shape or not torch.equal(loaded, tensor.to(loaded.dtype)):
            raise SystemExit(f"{key}: loaded tensor differs from {weights}")


def evaluate(model_dir: Path, stream_dir: Path, rows: list[dict[str, Any]]) -> tuple[float, list[int]]:
    """Load ``model_dir`` strictly with timm; return its top-1 accuracy and predictions on the stream."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True, pretrained_strict=True).eval()
    check_loaded(model, model_dir / "model.safetensors")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = torch.stack([transform(Image.open(stream_dir / r["file"]).convert("RGB")) for r in rows])
    with torch.inference_mode():
        preds = torch.cat([model(batch).argmax(1) for batch in x.split(64)]).tolist()
    labels = [r["label"] for r in rows]
    acc = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(rows)
    return acc, preds


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def versions() -> str:
    """Versions of the packages that shape the stream's pixels (corruptions may change across them)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("corrupt-tta", "numpy", "scipy", "scikit-image", "opencv-python", "pillow"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)


def write_readme(out: Path, command: str, n: int, seed: int, results: dict[str, Any]) -> None:
    import textwrap

    import corrupt_tta

    counts = results["corruption_counts"]
    mix = "Corruptions in the stream: " + ", ".join(f"{c} {counts[c]}" for c in CORRUPTIONS) + "."
    how = (
        f"The images are drawn from `shared/{CIFAR_TAR}` (test split) with `random.Random({seed})`, "
        "which also picks each image's corruption; numpy's global generator is re-seeded from "
        "`(seed, index)` before each image, and corrupt-tta's `impulse_noise` (which calls "
        "scikit-image's `random_noise` without a generator) is given a seeded one, so the output is "
        f"deterministic. Made with {versions()}; other versions of these may give slightly different pixels."
    )
    lines = [
        "# sample_data",
        "",
        "A small, committed sample for examples, documentation and quick tests that must run without",
        "`../shared`. Made by `sample_data/make_sample_data.py`; do not edit by hand, rerun the script.",
        "",
        "## What is here",
        "",
        f"* `stream/`: {n} CIFAR-10 test images (32x32 PNG), each corrupted at severity {SEVERITY} by one of",
        "  the 15 ImageNet-C corruptions (chosen per image), in random order: a mixed-shift stream. The",
        "  stream order is the file-name order (`0000.png`, `0001.png`, ...). `stream/labels.csv` has the",
        "  header `file,label,class,corruption`; `label` is the class index in the standard CIFAR-10 order",
        f"  ({', '.join(CLASSES)}).",
        "* `model/`: a timm model folder (`config.json` + `model.safetensors`), the float16 copy of",
        f"  `shared/{SOURCE_MODEL}` (timm `convnext_atto` with LayerNorm, 10 classes,",
        "  trained on CIFAR-10 train). Same `config.json` plus a `derived_from` note; every tensor is",
        "  stored as float16, and timm casts it back into the float32 model on loading:",
        '  `timm.create_model("local-dir:sample_data/model", pretrained=True)`.',
        "",
        "Top-1 accuracy on `stream/` with the model's own preprocessing",
        "(`timm.data.resolve_model_data_config` + `timm.data.create_transform`, 32x32, CIFAR-10 mean/std):",
        "",
        "| model | top-1 |",
        "|---|---|",
        f"| `model/` (float16 copy) | {results['acc_fp16']:.2%} |",
        f"| `shared/{SOURCE_MODEL}` (float32 original) | {results['acc_fp32']:.2%} |",
        "",
        f"The two agree on {results['agree']} of {n} predictions.",
        "",
        *textwrap.wrap(mix, 100),
        "",
        "## How it was made",
        "",
        "From the repository root, with `../shared` present (or `TTA_SHARED` set) and the optional",
        f"`corrupt-tta` package installed (version {corrupt_tta.__version__} was used):",
        "",
        "```",
        command,
        "```",
        "",
        *textwrap.wrap(how, 100),
        "",
        "## Licence",
        "",
        "* `stream/`: corrupted versions of images from the CIFAR-10 test set (Krizhevsky, 2009,",
        "  https://www.cs.toronto.edu/~kriz/cifar.html), used here as a small sample for testing.",
        f"* `model/`: derived from the project's shared model `shared/{SOURCE_MODEL}`",
        "  (trained by the project on CIFAR-10 train with `shared/tools/train_cifar_source.py`); only",
        "  its storage type was changed.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=default_shared(), help="the shared folder")
    ap.add_argument(
        "--out", type=Path, default=REPO_ROOT / "sample_data", help="output folder (default: sample_data)"
    )
    ap.add_argument("--n", type=int, default=320, help="number of stream images")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shared: Path = args.shared.resolve()
    out: Path = args.out.resolve()
    if not (shared / CIFAR_TAR).is_file() or not (shared / SOURCE_MODEL).is_dir():
        raise SystemExit(f"{shared} has no {CIFAR_TAR} or {SOURCE_MODEL}: pass --shared or set TTA_SHARED")

    # Rebuild from scratch, removing only what this script makes.
    stream_dir, model_dir = out / "stream", out / "model"
    for d in (stream_dir, model_dir):
        if d.exists():
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)

    rows = make_stream(shared, stream_dir, args.n, args.seed)
    make_model(shared, model_dir)

    acc16, pred16 = evaluate(model_dir, stream_dir, rows)
    acc32, pred32 = evaluate(shared / SOURCE_MODEL, stream_dir, rows)
    agree = sum(a == b for a, b in zip(pred16, pred32, strict=True))
    counts = {c: sum(r["corruption"] == c for r in rows) for c in CORRUPTIONS}
    results = {"acc_fp16": acc16, "acc_fp32": acc32, "agree": agree, "corruption_counts": counts}

    command = "python sample_data/make_sample_data.py"
    extra = [f"--{k} {v}" for k, v, d in (("n", args.n, 320), ("seed", args.seed, 0)) if v != d]
    if extra:
        command += " " + " ".join(extra)
    write_readme(out, command, args.n, args.seed, results)

    print(f"stream: {len(rows)} images, {dir_size(stream_dir) / 1e6:.2f} MB in {stream_dir}")
    print(f"model:  {dir_size(model_dir) / 1e6:.2f} MB in {model_dir}")
    print(f"total:  {dir_size(out) / 1e6:.2f} MB in {out}")
    print(f"top-1 on the stream: float16 copy {acc16:.2%}, float32 original {acc32:.2%}")
    print(f"predictions agreeing: {agree}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
