#!/usr/bin/env python3
"""auto's fallback towards the source (``bn_choice.SourceCheck``) on mixed-corruption streams.

    python benchmarks/auto_fallback.py --seeds 0            # the part the constants were chosen on
    python benchmarks/auto_fallback.py --seeds 1,2          # held out

Streams (BatchNorm CIFAR-10 ResNet-18 of ../shared, B = 64): 2,048 CIFAR-10 test images drawn from
all 15 corruptions at severity 5, ImageNet-C's parameters ("imagenet", the harsh ones) or
CIFAR-10-C's ("cifar"), class by class (every image of one class, then the next; the class order
and the draw seeded) or shuffled. Each method runs from a fresh copy of the model on the same
decoded batches; accuracy in %, and auto's share of batches with a fallback. The corrupted images
are made once under the benchmark cache (as ``benchmarks/verdict.py`` makes them).
"""

from __future__ import annotations

import argparse
import random
import sys

from _common import REPO, cache_dir, shared_dir

sys.path.insert(0, str(REPO))

MIXED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
         "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
         "jpeg_compression")
METHODS = ("source", "auto:bn_source_check=false", "auto")


def stream_items(root, class_names: list[str], images: int, order: str, seed: int, preset: str) -> list:
    from tta_cli.bench.settings import class_by_class, class_order, shuffled
    from tta_cli.sources.folder import folder_items

    pooled = [item for name in MIXED for item in folder_items(root / name / "5", class_names)]
    sample = random.Random(f"{seed}/{preset}").sample(pooled, min(images, len(pooled)))
    if order == "classes":
        return class_by_class(sample, class_order(sample, seed))
    return shuffled(sample, seed, "mixed")


def run(setup, spec: str, batches: list, batch_size: int, seed: int) -> tuple[float, float]:
    import torch

    from tta_cli.bench.runner import parse_methods
    from tta_cli.runtime import seed_everything

    method_spec = parse_methods(spec)[0]
    method = setup.build_method(method_spec.name, method_spec.hyperparameters, batch_size, fresh_copy=True)
    seed_everything(seed)
    correct = total = 0
    for images, labels in batches:
        with torch.no_grad():
            pred = method.step(images).logits.argmax(1)
        correct += int((pred == labels).sum())
        total += len(labels)
    share = float(method.stats().get("fallback_share", 0.0))
    method.close()
    return 100 * correct / total, share


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--presets", default="imagenet,cifar")
    ap.add_argument("--orders", default="classes,shuffled")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, tta bench's syntax")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared", default=None)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)

    import torch
    from cifar10_wild import corrupted, extract_cifar

    from tta_cli.runtime import start_run

    torch.set_num_threads(args.threads)
    shared = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz")
    cache = cache_dir(args.cache)
    test, _ = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, 500)
    setup = start_run(f"local-dir:{shared / 'models' / 'cifar10-resnet18-bn'}", device="cpu")
    methods = args.methods.split(",")
    print("| stream | seed | " + " | ".join(methods) + " | fallback share |")
    print("|---|---|" + "---|" * (len(methods) + 1))
    for preset in args.presets.split(","):
        root = corrupted(test, cache, ",".join(MIXED), 200 if preset == "imagenet" else 512, preset=preset)
        for order in args.orders.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                items = stream_items(root, setup.loaded.class_names, args.images, order, seed, preset)
                batches = [(b.images, b.labels) for b in setup.batches(items, args.batch_size) if b.items]
                results = [run(setup, spec, batches, args.batch_size, seed) for spec in methods]
                cells = " | ".join(f"{acc:.1f}" for acc, _ in results)
                print(f"| {preset} mixed, {order} | {seed} | {cells} | {results[-1][1]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
