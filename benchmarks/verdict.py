#!/usr/bin/env python3
"""The verdict benchmark: many labelled runs, the true accuracy change against the label-free
estimate and verdict (docs/TRUST.md).

    python benchmarks/verdict.py collect --part fit        # the runs the rule is chosen on
    python benchmarks/verdict.py collect --part held-out   # other corruptions, seeds and orders
    python benchmarks/verdict.py table                     # both parts, separately

``collect`` runs every method of the grid on a fresh copy of each model, with the run's own set-up
(``tta_cli.runtime``) and the method's own step, and keeps per image the label, the adapted model's
logits and the frozen source model's (``OUT/runs/<run>.npz``, one line per run in
``OUT/index.jsonl``; a rerun skips the runs already there). ``table`` never shows labels to the
estimate: it computes the estimate and the verdict from the logits alone, then compares them with
the true change.

Data (cached under ~/.cache/tta-cli/bench or $TTA_BENCH_CACHE, from ../shared or $TTA_SHARED):
CIFAR-10 test images, corrupted at severity 5 with CIFAR-10-C's parameters ("cifar") or ImageNet-C's
("imagenet", much harsher on 32 px images), for the three shared CIFAR-10 models (BatchNorm,
GroupNorm, LayerNorm).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from _common import REPO, cache_dir, shared_dir

sys.path.insert(0, str(REPO))

MODELS = {"bn": "cifar10-resnet18-bn", "gn": "cifar10-resnet18-gn", "ln": "cifar10-convnext-atto-ln"}
FIT_CORRUPTIONS = ("gaussian_noise", "fog")
HELD_OUT_CORRUPTIONS = ("shot_noise", "speckle_noise", "snow")
MIXED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
         "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
         "jpeg_compression")
METHODS = ("auto", "norm", "tent", "eta", "sar", "deyo", "rotta", "lame", "roid", "rdumb")
"""Every method on the BatchNorm model; GroupNorm and LayerNorm models run ``BATCH_FREE_METHODS``
(norm and rotta change nothing there but BatchNorm layers)."""
BATCH_FREE_METHODS = ("auto", "tent", "eta", "sar", "deyo", "lame", "roid", "rdumb")
STREAM_IMAGES = 512


@dataclass(frozen=True)
class RunSpec:
    part: str
    model: str
    data: str
    """clean, a corruption name, or mixed; with the preset: cifar/<name> or imagenet/<name>."""
    order: str
    """shuffled or classes (class by class, the class order shuffled by the seed)."""
    method: str
    batch_size: int
    seed: int

    @property
    def name(self) -> str:
        return (f"{self.model}-{self.data.replace('/', '_')}-{self.order}-{self.method}-b{self.batch_size}"
                f"-s{self.seed}")


def grid(part: str) -> Iterator[RunSpec]:
    """fit: seed 0, three corruptions, clean and mixed; held-out: seed 1, other corruptions, the
    harsher ImageNet-C parameters, batch size 16 and the class-ordered streams of both."""
    if part == "fit":
        datas = ["cifar/clean", *(f"cifar/{c}" for c in FIT_CORRUPTIONS), "cifar/mixed"]
        seed, size = 0, 64
    else:
        datas = [*(f"cifar/{c}" for c in HELD_OUT_CORRUPTIONS), "imagenet/mixed"]
        seed, size = 1, 16
    for model in MODELS:
        for data in datas if model == "bn" else datas[::2] if part == "fit" else datas[-1:]:
            for order in ("shuffled", "classes"):
                for method in METHODS if model == "bn" else BATCH_FREE_METHODS:
                    yield RunSpec(part, model, data, order, method, size, seed)


def stream_items(spec: RunSpec, class_names: list[str], test: Path, cache: Path) -> list:
    """``STREAM_IMAGES`` labelled images of the run's data in the run's order (seeded)."""
    from tta_cli.bench.settings import class_by_class, class_order
    from tta_cli.sources.folder import folder_items

    preset, data = spec.data.split("/")
    if data == "clean":
        items = folder_items(test, class_names)
    else:
        root = corrupted_root(test, cache, preset)
        names = MIXED if data == "mixed" else (data,)
        items = [item for name in names for item in folder_items(root / name / "5", class_names)]
    rng = random.Random(f"{spec.seed}/{spec.data}")
    items = rng.sample(items, min(STREAM_IMAGES, len(items)))
    if spec.order == "classes":
        items = class_by_class(items, class_order(items, spec.seed))
    return items


def corrupted_root(test: Path, cache: Path, preset: str) -> Path:
    from cifar10_wild import corrupted

    names = ",".join(dict.fromkeys((*MIXED, *FIT_CORRUPTIONS, *HELD_OUT_CORRUPTIONS)))
    return corrupted(test, cache, names, 200 if preset == "imagenet" else 512, preset=preset)


@dataclass
class Stream:
    """A stream decoded once, with the frozen source model's logits: every method's run reuses it."""

    images: list  # one tensor per batch
    labels: np.ndarray
    source: np.ndarray


def decoded_stream(setup, items: list, batch_size: int) -> Stream:
    import torch

    from tta_cli.reference import SourceReference

    reference = SourceReference(setup.loaded.model, "all")
    images, labels, source = [], [], []
    for batch in setup.batches(items, batch_size):
        if batch.items:
            images.append(batch.images)
            labels.append(batch.labels)
            source.append(reference.logits(batch.images))
    return Stream(images, torch.cat(labels).numpy(), torch.cat(source).numpy().astype(np.float32))


def run_one(spec: RunSpec, setup, stream: Stream) -> np.ndarray:
    """The method's own step on every batch, in order: the adapted model's logits."""
    import torch

    from tta_cli.runtime import seed_everything

    method = setup.build_method(spec.method, {}, spec.batch_size, fresh_copy=True)
    seed_everything(spec.seed)
    method.reseed(spec.seed)
    adapted = [method.step(images).logits.detach().float() for images in stream.images]
    method.close()
    return torch.cat(adapted).numpy().astype(np.float32)


def collect(args: argparse.Namespace) -> None:
    import torch
    from cifar10_wild import extract_cifar

    from tta_cli.runtime import start_run

    shared = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz")
    cache = cache_dir(args.cache)
    test, _ = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, 500)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in _lines(out / "index.jsonl")}
    torch.set_num_threads(args.threads)
    specs = [s for s in grid(args.part) if s.name not in done and (not args.only or s.model in args.only.split(","))]
    setups: dict[str, object] = {}
    streams: dict[tuple, Stream] = {}
    for i, spec in enumerate(specs):
        if spec.model not in setups:
            setups[spec.model] = start_run(f"local-dir:{shared / 'models' / MODELS[spec.model]}", device="cpu")
        setup = setups[spec.model]
        key = (spec.model, spec.data, spec.order, spec.batch_size, spec.seed)
        if key not in streams:
            streams.clear()
            streams[key] = decoded_stream(setup, stream_items(spec, setup.loaded.class_names, test, cache),
                                          spec.batch_size)
        stream = streams[key]
        started = time.perf_counter()
        arrays = {"labels": stream.labels, "source": stream.source, "adapted": run_one(spec, setup, stream)}
        np.savez_compressed(out / "runs" / f"{spec.name}.npz", **arrays)
        row = {"name": spec.name, **asdict(spec), "images": len(arrays["labels"]),
               "source_accuracy": accuracy(arrays["source"], stream.labels),
               "accuracy": accuracy(arrays["adapted"], stream.labels),
               "seconds": time.perf_counter() - started}
        with (out / "index.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(specs)}] {spec.name}: {100 * row['source_accuracy']:.1f} -> "
              f"{100 * row['accuracy']:.1f} ({row['seconds']:.1f} s)", flush=True)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run the grid (skips runs already in OUT)")
    c.add_argument("--part", choices=("fit", "held-out"), default="fit")
    c.add_argument("--only", default=None, help="models, comma-separated (bn,gn,ln)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--shared", default=None)
    c.add_argument("--cache", default=None)
    t = sub.add_parser("table", help="the estimate and verdict against the truth, per part")
    t.add_argument("--reference", choices=("sampled", "all"), default="sampled",
                   help="judge from the rows a reference of this mode sees (tta adapt's default: sampled)")
    t.add_argument("--all-first", type=int, default=None,
                   help="sampled: reference every image up to this one (default: tta's REFERENCE_ALL_FIRST); "
                        "lower it to see the sample's effect on these short runs")
    for p in (c, t):
        p.add_argument("--out", default="runs/verdict")
    args = ap.parse_args(argv)
    if args.command == "collect":
        collect(args)
    else:
        from verdict_table import print_tables

        import tta_cli.reference

        if args.all_first is not None:
            tta_cli.reference.REFERENCE_ALL_FIRST = args.all_first
        print_tables(Path(args.out), args.reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
