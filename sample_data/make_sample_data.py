#!/usr/bin/env python3
"""Build the small, committed sample data set in ``sample_data/``.

The project's examples, documentation and quick tests need a real image stream and a real model
without the (large, not redistributed) ``../shared`` folder. This script makes both from ``shared``
and rebuilds them from scratch each time it runs:

The point of the sample is the quick start: it must show test-time adaptation improving the
predictions. So the model has BatchNorm (whose statistics the methods re-estimate on the test
stream) and the stream has one shift that BatchNorm adaptation is known to correct (sensor noise).

``<out>/stream/``
    ``--n`` (320) CIFAR-10 *test* images, drawn with ``--seed`` from
    ``shared/data/cifar10-jpeg.tar.gz``, each corrupted by ``--corruptions`` (default
    ``gaussian_noise``; with several, one chosen per image with the seed) at ``--severity`` (3) using
    the ``corrupt-tta`` package. A flat folder of PNG files whose names give the stream order
    (``0000.png``, ...), plus ``labels.csv`` with the header ``file,label,class,corruption``
    (``label`` is the class index in the standard CIFAR-10 order).

``<out>/model/``
    A timm model folder (``config.json`` + ``model.safetensors``) derived from
    ``shared/models/cifar10-resnet18-bn`` (timm ``resnet18`` with BatchNorm, trained on CIFAR-10
    train): the second residual block of its last stage is left out (``model_args`` ``layers``
    ``[2, 2, 2, 1]``, 6.5 M instead of 11.2 M parameters, so that the folder stays well under 20 MB;
    residual networks lose little from dropping one non-downsampling block, and the clean accuracy
    is measured below) and every floating tensor is stored as float16. timm casts the tensors back
    into the float32 model when it loads the folder.

``<out>/README.md``
    What is there, the command that made it, the accuracies measured below and a licence note.

After building, the script checks that ``timm.create_model("local-dir:<out>/model",
pretrained=True)`` loads the folder strictly; measures its top-1 accuracy on the clean and the
corrupted images, and that of the full float32 original; and runs ``python -m tta_cli adapt`` on the
stream with each method in ``METHODS`` (the quick start's command, ``--method`` varied), recording
the accuracy each reports in its ``run.json``.

Determinism: the sample is drawn with ``random.Random(seed)``, and numpy's global generator is
re-seeded from ``(seed, index)`` before each image is corrupted, since most corruptions draw their
noise from ``np.random``. ``impulse_noise`` is the exception: it calls scikit-image's
``random_noise`` without a generator, so it would differ on every run; while corrupting, that call
is wrapped to pass a generator seeded from ``np.random``.

usage: python sample_data/make_sample_data.py [--shared DIR] [--out DIR] [--n 320] [--seed 0]
           [--corruptions gaussian_noise] [--severity 3]
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
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_MODEL = "models/cifar10-resnet18-bn"
LAYERS = [2, 2, 2, 1]
DROPPED = "layer4.1."  # the tensors of the block left out
METHODS = ["auto", "source", "norm", "tent", "sar"]
CIFAR_TAR = "data/cifar10-jpeg.tar.gz"
SEVERITY = 3
DEFAULT_CORRUPTIONS = ["gaussian_noise"]
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


def make_stream(shared: Path, out_dir: Path, n: int, seed: int, corruptions: list[str],
                severity: int) -> list[dict[str, Any]]:
    """Write ``n`` corrupted test images and ``labels.csv`` to ``out_dir``; return the rows."""
    import corrupt_tta

    from tta_cli.bench.corrupt import seeded_impulse_noise

    items = read_cifar_test(shared / CIFAR_TAR)
    if not 0 < n <= len(items):
        raise SystemExit(f"--n must be in 1..{len(items)}, got {n}")
    rng = random.Random(seed)
    chosen = rng.sample(items, n)
    per_image = [rng.choice(corruptions) for _ in chosen]
    width = max(4, len(str(n - 1)))
    out_dir.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    with seeded_impulse_noise(corrupt_tta):
        for index, ((_, label, data), corruption) in enumerate(zip(chosen, per_image, strict=True)):
            np.random.seed([seed, index])
            img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            corrupted = corrupt_tta.corrupt(img, severity=severity, corruption_name=corruption)
            img = np.clip(np.asarray(corrupted), 0, 255).astype(np.uint8)
            name = f"{index:0{width}d}.png"
            Image.fromarray(img).save(out_dir / name)
            rows.append({"file": name, "label": label, "class": CLASSES[label], "corruption": corruption,
                         "clean_jpeg": data})
    with open(out_dir / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "class", "corruption"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def make_model(shared: Path, out_dir: Path) -> None:
    """Write the shallower float16 copy of the shared ResNet-18 (BatchNorm) folder to ``out_dir``."""
    import torch
    from safetensors.torch import load_file, save_file

    src = shared / SOURCE_MODEL
    config = json.loads((src / "config.json").read_text())
    config["model_args"] = {**config.get("model_args", {}), "layers": LAYERS}
    config["derived_from"] = (
        f"shared/{SOURCE_MODEL} without the second residual block of its last stage ({DROPPED}*, "
        f"model_args layers {LAYERS}) and with every floating tensor stored as float16, made by "
        "sample_data/make_sample_data.py"
    )
    tensors = load_file(src / "model.safetensors")
    kept = {
        key: (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
        for key, t in tensors.items() if not key.startswith(DROPPED)
    }
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(kept, out_dir / "model.safetensors", metadata={"format": "pt"})
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


def evaluate(model_dir: Path, images: list[Image.Image], labels: list[int]) -> float:
    """Load ``model_dir`` strictly with timm; its top-1 accuracy on ``images`` (eval mode, the
    model's own preprocessing)."""
    import timm
    import torch

    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True, pretrained_strict=True).eval()
    check_loaded(model, model_dir / "model.safetensors")
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    x = torch.stack([transform(image.convert("RGB")) for image in images])
    with torch.inference_mode():
        preds = torch.cat([model(batch).argmax(1) for batch in x.split(64)]).tolist()
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


def adapt_accuracy(out: Path, method: str, scratch: Path) -> tuple[float, float]:
    """The quick start's command with ``--method method``: (accuracy from its run.json, seconds)."""
    run_dir = scratch / method
    command = [
        sys.executable, "-m", "tta_cli", "adapt", str(out / "stream"), "--labels", str(out / "stream" / "labels.csv"),
        "--model", f"local-dir:{out / 'model'}", "--method", method, "--out", str(run_dir), "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(command, check=True, env=env, cwd=REPO_ROOT)
    record = json.loads((run_dir / "run.json").read_text())
    return float(record["accuracy"]), float(record["timing"]["seconds"])


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def versions() -> str:
    """Versions of the packages that shape the stream's pixels (corruptions may change across them)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("corrupt-tta", "numpy", "scipy", "scikit-image", "opencv-python", "pillow", "torch", "timm"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{dist} {version(dist)}")
    return ", ".join(found)


def write_readme(out: Path, command: str, args: argparse.Namespace, results: dict[str, Any]) -> None:
    import textwrap

    import corrupt_tta

    n, seed, severity, corruptions = args.n, args.seed, args.severity, args.corruptions
    counts = results["corruption_counts"]
    shift = (f"corrupted by `{corruptions[0]}` at severity {severity}" if len(corruptions) == 1 else
             f"each corrupted at severity {severity} by one of {', '.join(corruptions)} (chosen per image)")
    mix = "Corruptions in the stream: " + ", ".join(f"{c} {counts[c]}" for c in corruptions) + "."
    how = (
        f"The images are drawn from `shared/{CIFAR_TAR}` (test split) with `random.Random({seed})`, "
        "which also picks each image's corruption; numpy's global generator is re-seeded from "
        "`(seed, index)` before each image, and corrupt-tta's `impulse_noise` (which calls "
        "scikit-image's `random_noise` without a generator) is given a seeded one, so the output is "
        f"deterministic. Made with {versions()}; other versions of these may give slightly different pixels."
    )
    method_rows = [f"| `{m}`{' (the default)' if m == 'auto' else ''} | {acc:.2%} | {seconds:.1f} s |"
                   for m, (acc, seconds) in results["methods"].items()]
    lines = [
        "# sample_data",
        "",
        "A small, committed sample for the quick start, examples, documentation and quick tests that must",
        "run without `../shared`. Made by `sample_data/make_sample_data.py`; do not edit by hand, rerun the",
        "script.",
        "",
        "## What is here",
        "",
        f"* `stream/`: {n} CIFAR-10 test images (32x32 PNG), {shift}, in random order.",
        "  The stream order is the file-name order (`0000.png`, `0001.png`, ...). `stream/labels.csv` has",
        "  the header `file,label,class,corruption`; `label` is the class index in the standard CIFAR-10",
        f"  order ({', '.join(CLASSES)}).",
        f"* `model/`: a timm model folder (`config.json` + `model.safetensors`) derived from `shared/{SOURCE_MODEL}`",
        "  (timm `resnet18` with BatchNorm, 10 classes, trained on CIFAR-10 train): the second residual",
        f"  block of its last stage is left out (`model_args` `layers` {LAYERS}: 6.5 M instead of 11.2 M",
        "  parameters, to keep this folder small) and every tensor is stored as float16; timm casts it back",
        '  into the float32 model on loading: `timm.create_model("local-dir:sample_data/model", pretrained=True)`.',
        "",
        "Top-1 accuracy, eval mode, the model's own preprocessing (32x32, CIFAR-10 mean/std):",
        "",
        "| model | clean images | `stream/` |",
        "|---|---|---|",
        f"| `model/` | {results['clean']:.2%} | {results['stream']:.2%} |",
        f"| `shared/{SOURCE_MODEL}` (full depth, float32) | {results['clean_full']:.2%} "
        f"| {results['stream_full']:.2%} |",
        "",
        "(\"clean images\": the same test images before corruption.) The quick start's command on `stream/`,",
        "`python -m tta_cli adapt sample_data/stream --labels sample_data/stream/labels.csv",
        "--model local-dir:sample_data/model --method M --out DIR`, with each method:",
        "",
        "| `--method` | accuracy | seconds (run.json) |",
        "|---|---|---|",
        *method_rows,
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
        "  (trained by the project on CIFAR-10 train with `shared/tools/train_cifar_source.py`); one block",
        "  left out and the storage type changed.",
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
    ap.add_argument("--corruptions", nargs="+", default=DEFAULT_CORRUPTIONS, choices=CORRUPTIONS, metavar="NAME",
                    help=f"one or more of the 15 ImageNet-C corruptions (default: {' '.join(DEFAULT_CORRUPTIONS)})")
    ap.add_argument("--severity", type=int, default=SEVERITY, choices=range(1, 6))
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

    rows = make_stream(shared, stream_dir, args.n, args.seed, args.corruptions, args.severity)
    make_model(shared, model_dir)

    labels = [r["label"] for r in rows]
    clean = [Image.open(io.BytesIO(r["clean_jpeg"])) for r in rows]
    stream = [Image.open(stream_dir / r["file"]) for r in rows]
    results: dict[str, Any] = {
        "clean": evaluate(model_dir, clean, labels),
        "stream": evaluate(model_dir, stream, labels),
        "clean_full": evaluate(shared / SOURCE_MODEL, clean, labels),
        "stream_full": evaluate(shared / SOURCE_MODEL, stream, labels),
        "corruption_counts": {c: sum(r["corruption"] == c for r in rows) for c in args.corruptions},
    }
    with tempfile.TemporaryDirectory() as scratch:
        results["methods"] = {m: adapt_accuracy(out, m, Path(scratch)) for m in METHODS}

    command = "python sample_data/make_sample_data.py"
    defaults = {"n": 320, "seed": 0, "severity": SEVERITY, "corruptions": DEFAULT_CORRUPTIONS}
    extra = [f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, d in defaults.items()
             if (v := getattr(args, k)) != d]
    if extra:
        command += " " + " ".join(extra)
    write_readme(out, command, args, results)

    print(f"stream: {len(rows)} images, {dir_size(stream_dir) / 1e6:.2f} MB in {stream_dir}")
    print(f"model:  {dir_size(model_dir) / 1e6:.2f} MB in {model_dir}")
    print(f"total:  {dir_size(out) / 1e6:.2f} MB in {out}")
    print(f"top-1 of model/: clean {results['clean']:.2%}, stream {results['stream']:.2%}; full original: "
          f"clean {results['clean_full']:.2%}, stream {results['stream_full']:.2%}")
    for method, (acc, seconds) in results["methods"].items():
        print(f"tta adapt --method {method}: {acc:.2%} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
