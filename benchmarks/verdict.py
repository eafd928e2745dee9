#!/usr/bin/env python3
"""The verdict benchmark: many labelled runs, the true accuracy change against the label-free
estimate and verdict (docs/TRUST.md).

    python benchmarks/verdict.py collect --part fit        # the runs the rule is chosen on
    python benchmarks/verdict.py collect --part held-out   # other corruptions, seeds and orders
    python benchmarks/verdict.py collect --part third      # seed 2, B = 32, still other corruptions
    python benchmarks/verdict.py table                     # every part, separately

``collect`` runs every method of the grid on a fresh copy of each model, with the run's own set-up
(``tta_cli.runtime``) and the method's own step, and keeps per image the label, the adapted model's
logits and the frozen source model's (``OUT/runs/<run>.npz``, one line per run in
``OUT/index.jsonl``; a rerun skips the runs already there). ``table`` never shows labels to the
estimate: it computes the estimate and the verdict from the logits alone, then compares them with
the true change.

Data (cached under ~/.cache/tta-cli/bench or $TTA_BENCH_CACHE, from ../shared or $TTA_SHARED):
CIFAR-10 test images, corrupted at severity 5 with CIFAR-10-C's parameters ("cifar") or ImageNet-C's
("imagenet", much harsher on 32 px images), for the three shared CIFAR-10 models (BatchNorm,
GroupNorm, LayerNorm); and the 1,000-image ImageNet sample ("inet/...", 224 px centre crops, ImageNet-C
corruptions) for EfficientNet-Lite0 with its real ImageNet weights (``imagenet_wild.py`` builds both).
The held-out part also holds the *second wave* (``second_wave``): EfficientNet-Lite0, batch sizes
1-8, and the methods cotta, eata, zerosiam, come and foa_shift, which ``table`` reports apart too.
The *third wave* (``--part third``) was collected to test signals found on the second wave's misses
before adopting them (docs/TRUST.md).
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

MODELS = {"bn": "cifar10-resnet18-bn", "gn": "cifar10-resnet18-gn", "ln": "cifar10-convnext-atto-ln",
          "lite0": "tf_efficientnet_lite0 (ImageNet weights, imagenet_wild.model_folder)"}
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
NEW_METHODS = ("cotta", "eata", "zerosiam", "come", "foa_shift")
"""Methods of the second wave; eata and foa_shift learn from clean images (``CLEAN_IMAGES``)."""
CLEAN_IMAGES = 128
"""Clean images, never in a stream, for eata's Fisher and foa_shift's source feature mean."""
SMALL_BATCH_METHODS = ("auto", "norm", "tent", "eta", "sar", "lame", "rotta")
INET_STREAM_IMAGES = 256
"""EfficientNet-Lite0 at 224 px costs about 20 ms per image forward on one core pair: short streams."""
INET_CORRUPTIONS = ("gaussian_noise", "fog", "contrast")
INET_MIXED = ("gaussian_noise", "shot_noise", "defocus_blur", "fog", "brightness", "contrast", "jpeg_compression",
              "pixelate")
"""inet/mixed: 32 classes x these 8 corrupted versions of their image (the sample has one image per
class, so a class-ordered ImageNet stream needs several versions of each)."""
INET_METHODS = ("auto", "norm", "tent", "eta", "eata", "sar", "deyo", "lame", "roid", "rotta", "zerosiam", "come",
                "foa_shift")


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
    if part == "third":
        yield from third_wave()
        return
    if part == "fit":
        datas = ["cifar/clean", *(f"cifar/{c}" for c in FIT_CORRUPTIONS), "cifar/mixed"]
        seed, size = 0, 64
    else:
        datas = [*(f"cifar/{c}" for c in HELD_OUT_CORRUPTIONS), "imagenet/mixed"]
        seed, size = 1, 16
    for model in ("bn", "gn", "ln"):
        for data in datas if model == "bn" else datas[::2] if part == "fit" else datas[-1:]:
            for order in ("shuffled", "classes"):
                for method in METHODS if model == "bn" else BATCH_FREE_METHODS:
                    yield RunSpec(part, model, data, order, method, size, seed)
    if part == "held-out":
        yield from second_wave()


def second_wave() -> Iterator[RunSpec]:
    """Held-out cells added after the rule was chosen: EfficientNet-Lite0 on ImageNet photos, batch
    sizes 1, 4 and 8, and the methods cotta, eata, zerosiam, come and foa_shift."""
    for order, datas in (("shuffled", ["inet/clean", *(f"inet/{c}" for c in INET_CORRUPTIONS), "inet/mixed"]),
                         ("classes", ["inet/mixed"])):
        for data in datas:
            for method in INET_METHODS:
                yield RunSpec("held-out", "lite0", data, order, method, 16, 1)
    for order in ("shuffled", "classes"):  # cotta: 32 augmented forwards per uncertain batch
        yield RunSpec("held-out", "lite0", "inet/mixed", order, "cotta", 16, 1)
    for model, datas in (("bn", ("cifar/shot_noise", "imagenet/mixed")), ("gn", ("imagenet/mixed",)),
                         ("ln", ("imagenet/mixed",))):
        for data in datas:
            for order in ("shuffled", "classes"):
                for method in NEW_METHODS:
                    yield RunSpec("held-out", model, data, order, method, 16, 1)
    few = ("auto", "tent", "sar", "lame")
    for model, sizes, methods in (("bn", (1, 4, 8), SMALL_BATCH_METHODS), ("gn", (1, 4), few), ("ln", (4,), few)):
        data = "cifar/snow" if model == "bn" else "imagenet/mixed"
        for size in sizes:
            for order in ("shuffled", "classes"):
                for method in methods:
                    yield RunSpec("held-out", model, data, order, method, size, 1)


THIRD_INET = ("defocus_blur", "brightness", "jpeg_compression", "shot_noise", "pixelate")
"""Third wave, EfficientNet-Lite0: single corruptions no earlier wave streamed alone."""
THIRD_CIFAR = ("defocus_blur", "contrast", "pixelate")
"""Third wave, the CIFAR-10 models: corruptions no earlier wave streamed alone."""


def third_wave() -> Iterator[RunSpec]:
    """Held-out cells added to test label-free signals found on the second wave's misses: seed 2,
    batch size 32 (no earlier wave's), corruptions no earlier wave streamed alone."""
    for data in [*(f"inet/{c}" for c in THIRD_INET), "inet/mixed"]:
        for order in ("shuffled", "classes") if data == "inet/mixed" else ("shuffled",):
            for method in INET_METHODS:
                yield RunSpec("third", "lite0", data, order, method, 32, 2)
    for model in ("bn", "gn", "ln"):
        for corruption in THIRD_CIFAR if model == "bn" else THIRD_CIFAR[1:2]:
            for order in ("shuffled", "classes"):
                for method in METHODS if model == "bn" else BATCH_FREE_METHODS:
                    yield RunSpec("third", model, f"cifar/{corruption}", order, method, 32, 2)


def is_second_wave(row: dict) -> bool:
    """The index row (or ``RunSpec`` fields) is one of ``second_wave``'s cells."""
    return row["part"] == "held-out" and (row["model"] == "lite0" or row["batch_size"] < 16
                                          or row["method"] in NEW_METHODS)


def stream_items(spec: RunSpec, class_names: list[str], test: Path, cache: Path) -> list:
    """``STREAM_IMAGES`` labelled images of the run's data in the run's order (seeded)."""
    from tta_cli.bench.settings import class_by_class, class_order
    from tta_cli.sources.folder import folder_items

    preset, data = spec.data.split("/")
    if preset == "inet":
        return inet_items(spec, class_names, cache)
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


def inet_items(spec: RunSpec, class_names: list[str], cache: Path) -> list:
    """The ImageNet sample's 224 px crops (``imagenet_wild``'s seeded 256 images, one per class):
    one corruption shuffled, or ``inet/mixed``: 32 of those classes x the ``INET_MIXED`` versions."""
    from tta_cli.bench.settings import class_by_class, class_order
    from tta_cli.sources.folder import folder_items

    root = inet_corrupted(cache)
    data = spec.data.split("/")[1]
    rng = random.Random(f"{spec.seed}/{spec.data}")
    if data != "mixed":
        items = folder_items(root / data / "5", class_names)
        rng.shuffle(items)
        return items[:INET_STREAM_IMAGES]
    by_name = {name: folder_items(root / name / "5", class_names) for name in INET_MIXED}
    classes = set(rng.sample(sorted({item.label for item in by_name[INET_MIXED[0]]}),
                             INET_STREAM_IMAGES // len(INET_MIXED)))
    items = [item for name in INET_MIXED for item in by_name[name] if item.label in classes]
    rng.shuffle(items)
    return class_by_class(items, class_order(items, spec.seed)) if spec.order == "classes" else items


def inet_paths(shared: Path, cache: Path) -> tuple[Path, Path]:
    """EfficientNet-Lite0's model folder and the clean crops not in any stream (``imagenet_wild``)."""
    from imagenet_wild import clean_accuracy, corrupted, extract_sample, fisher_images, model_folder

    sample, wnids = extract_sample(shared / "data" / "imagenet-sample-256.tar.gz", cache)
    model = model_folder(cache, wnids)
    clean = corrupted(sample, cache, "clean", None) / "clean" / "5"
    print(f"EfficientNet-Lite0 clean top-1: {100 * clean_accuracy(model, clean, None)['top1']:.1f}%")
    inet_corrupted(cache, sample)
    return model, fisher_images(sample, cache, INET_STREAM_IMAGES, clean)


def inet_corrupted(cache: Path, sample: Path | None = None) -> Path:
    """The ``INET_STREAM_IMAGES`` seeded crops under every corruption used (made when ``sample`` is given)."""
    from imagenet_wild import corrupted

    names = ",".join(dict.fromkeys(("clean", *INET_CORRUPTIONS, *INET_MIXED)))
    if sample is not None:
        return corrupted(sample, cache, names, INET_STREAM_IMAGES)
    return cache / f"imagenet-sample-c-{INET_STREAM_IMAGES}"


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


def run_one(spec: RunSpec, setup, stream: Stream, prepared: dict | None = None) -> np.ndarray:
    """The method's own step on every batch, in order (with what it learnt from clean images, if
    it learns any): the adapted model's logits."""
    import torch

    from tta_cli.runtime import seed_everything

    method = setup.build_method(spec.method, {}, spec.batch_size, prepared=prepared, fresh_copy=True)
    seed_everything(spec.seed)
    method.reseed(spec.seed)
    adapted = [method.step(images).logits.detach().float() for images in stream.images]
    method.close()
    return torch.cat(adapted).numpy().astype(np.float32)


def collect(args: argparse.Namespace) -> None:
    import torch
    from cifar10_wild import extract_cifar

    from tta_cli.runtime import start_run, uses_clean_data

    shared = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz")
    cache = cache_dir(args.cache)
    test, fisher = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, 500)
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    done = {json.loads(line)["name"] for line in _lines(out / "index.jsonl")}
    torch.set_num_threads(args.threads)
    specs = [s for s in grid(args.part) if s.name not in done and (not args.only or s.model in args.only.split(","))
             and (not args.methods or s.method in args.methods.split(","))]
    setups: dict[str, object] = {}
    clean: dict[str, Path] = {}
    prepared: dict[tuple, dict] = {}
    streams: dict[tuple, Stream] = {}
    for i, spec in enumerate(specs):
        if spec.model not in setups:
            if spec.model == "lite0":
                folder, clean["lite0"] = inet_paths(shared_dir(args.shared, "data/imagenet-sample-256.tar.gz"), cache)
            else:
                folder, clean[spec.model] = shared / "models" / MODELS[spec.model], fisher
            setups[spec.model] = start_run(f"local-dir:{folder}", device="cpu")
        setup = setups[spec.model]
        if uses_clean_data(spec.method) and (spec.model, spec.method, spec.batch_size) not in prepared:
            prepared[spec.model, spec.method, spec.batch_size] = clean_preparation(setup, spec, clean[spec.model])
        key = (spec.model, spec.data, spec.order, spec.batch_size, spec.seed)
        if key not in streams:
            streams.clear()
            streams[key] = decoded_stream(setup, stream_items(spec, setup.loaded.class_names, test, cache),
                                          spec.batch_size)
        stream = streams[key]
        started = time.perf_counter()
        adapted = run_one(spec, setup, stream, prepared.get((spec.model, spec.method, spec.batch_size)))
        arrays = {"labels": stream.labels, "source": stream.source, "adapted": adapted}
        np.savez_compressed(out / "runs" / f"{spec.name}.npz", **arrays)
        row = {"name": spec.name, **asdict(spec), "images": len(arrays["labels"]),
               "source_accuracy": accuracy(arrays["source"], stream.labels),
               "accuracy": accuracy(arrays["adapted"], stream.labels),
               "seconds": time.perf_counter() - started}
        with (out / "index.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{i + 1}/{len(specs)}] {spec.name}: {100 * row['source_accuracy']:.1f} -> "
              f"{100 * row['accuracy']:.1f} ({row['seconds']:.1f} s)", flush=True)


def clean_preparation(setup, spec: RunSpec, folder: Path) -> dict:
    """What eata or foa_shift learns from ``CLEAN_IMAGES`` seeded clean images of ``folder``."""
    from tta_cli.sources.folder import folder_items

    items = random.Random(f"{spec.seed}/clean").sample(folder_items(folder, setup.loaded.class_names), CLEAN_IMAGES)
    prepared, _ = setup.prepare(spec.method, items, spec.batch_size)
    return prepared


def input_shift(args: argparse.Namespace) -> None:
    """Per ImageNet-C corruption, EfficientNet-Lite0's first BatchNorm input: the largest
    |log(channel variance / the source's running variance)| per batch of ``--batch-size`` (the
    quantity auto's input-shift gate compares with ln 4), median and range over the batches."""
    import torch

    from tta_cli.methods.selection import batchnorm_layers
    from tta_cli.runtime import start_run
    from tta_cli.sources.folder import folder_items

    torch.set_num_threads(args.threads)
    cache = cache_dir(args.cache)
    folder, _ = inet_paths(shared_dir(args.shared, "data/imagenet-sample-256.tar.gz"), cache)
    setup = start_run(f"local-dir:{folder}", device="cpu")
    first = batchnorm_layers(setup.loaded.model)[0]
    source_var = first.running_var.detach().float()
    shifts: list[float] = []

    def hook(module, inputs) -> None:
        flat = inputs[0].float().flatten(2)
        var = (flat.pow(2).mean(2).mean(0) - flat.mean(2).mean(0) ** 2).clamp_min(1e-12)
        shifts.append(float((var / source_var.clamp_min(1e-12)).log().abs().max()))
        raise StopIteration  # the rest of the forward is not needed

    first.register_forward_pre_hook(hook)
    print(f"| corruption | batches of {args.batch_size} | median | min | max | share above ln 4 |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(("clean", *INET_CORRUPTIONS, *INET_MIXED)):
        shifts.clear()
        items = folder_items(inet_corrupted(cache) / name / "5", setup.loaded.class_names)
        random.Random(name).shuffle(items)
        for batch in setup.batches(items, args.batch_size):
            try:
                with torch.no_grad():
                    setup.loaded.model(batch.images)
            except StopIteration:
                pass
        values = np.array(shifts)
        print(f"| {name} | {len(values)} | {np.median(values):.2f} | {values.min():.2f} | {values.max():.2f} | "
              f"{(values > np.log(4)).mean():.2f} |")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run the grid (skips runs already in OUT)")
    c.add_argument("--part", choices=("fit", "held-out", "third"), default="fit")
    c.add_argument("--only", default=None, help="models, comma-separated (bn,gn,ln,lite0)")
    c.add_argument("--methods", default=None, help="methods, comma-separated (default: the grid's)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--shared", default=None)
    c.add_argument("--cache", default=None)
    s = sub.add_parser("input-shift", help="EfficientNet-Lite0's first-BatchNorm input shift per corruption")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--shared", default=None)
    s.add_argument("--cache", default=None)
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
    elif args.command == "input-shift":
        input_shift(args)
    else:
        from verdict_table import print_tables

        import tta_cli.reference

        if args.all_first is not None:
            tta_cli.reference.REFERENCE_ALL_FIRST = args.all_first
        print_tables(Path(args.out), args.reference)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
