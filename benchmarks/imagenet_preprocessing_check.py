#!/usr/bin/env python3
"""Does ImageNet mean/std (as the authors' SAR code applies to every model) explain their larger fog
gain with EfficientNet-Lite0 (trained with mean = std = 0.5)?

Runs source, norm and tent (B = 64) on the cached ImageNet-S-W mild streams (fog, gaussian_noise;
the same seeded shuffles as ``tta bench``'s mild setting) twice: with the model's own preprocessing
and with ImageNet mean/std. Reuses the cache of ``benchmarks/imagenet_wild.py``:

    # the 320-image mild streams of the quick benchmark (about 7 minutes of one CPU core)
    python benchmarks/imagenet_preprocessing_check.py
    # all 1,000 sample images: corrupted first into DIR (seed 0, crop 224, as imagenet_wild.py
    # does; the 320 above are the same pixels), about 25 minutes
    python benchmarks/imagenet_preprocessing_check.py --corrupt-into /tmp/inet-c-1000
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import timm.data
import torch

from tta_cli.bench.data import find_corrupted
from tta_cli.bench.settings import build_streams
from tta_cli.runtime import start_run
from tta_cli.sources.loader import iter_batches

CACHE = Path(os.environ.get("TTA_BENCH_CACHE") or Path.home() / ".cache" / "tta-cli" / "bench")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(CACHE / "tf_efficientnet_lite0-pypi"))
    ap.add_argument("--data", default=str(CACHE / "imagenet-sample-c-320"))
    ap.add_argument("--corruptions", default="fog,gaussian_noise")
    ap.add_argument("--methods", default="source,norm,tent")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corrupt-into", default=None,
                    help="corrupt all 1,000 cached sample images into this folder and use it as --data")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.corrupt_into:
        from tta_cli.bench.corrupt import CorruptPlan, corrupt_folder

        plan = CorruptPlan(CACHE / "imagenet-sample", Path(args.corrupt_into), args.corruptions.split(","),
                           [5], seed=0, limit=None, crop=224)
        report = corrupt_folder(plan)
        print(f"{args.corrupt_into}: {report.written} written, {report.existing} already there")
        args.data = args.corrupt_into

    setup = start_run(f"local-dir:{args.model}", seed=args.seed)
    loaded = setup.loaded
    found = find_corrupted(Path(args.data), loaded.class_names, 5, args.corruptions.split(","))
    assert found is not None, f"no corrupted images under {args.data}"
    streams = build_streams(found.by_corruption, ["mild"], args.batch_size, args.seed)
    variants = {
        "model's own (mean = std = 0.5)": {},
        "ImageNet mean/std": {"mean": IMAGENET[0], "std": IMAGENET[1]},
    }
    print(f"model {loaded.spec} sha256 {loaded.weights_sha256[:12]}; data {args.data}; "
          f"B={args.batch_size}, seed {args.seed}")
    for stream in streams:
        print(f"\n{stream.corruption}, {len(stream.items)} images")
        print("| preprocessing | " + " | ".join(args.methods.split(",")) + " |")
        print("|---|" + "---|" * len(args.methods.split(",")))
        for label, change in variants.items():
            cfg = dict(loaded.data_config, **change)
            transform = timm.data.create_transform(**cfg, is_training=False)
            batches = list(iter_batches(stream.items, transform, stream.batch_size))
            cells = []
            for name in args.methods.split(","):
                random.seed(args.seed)
                torch.manual_seed(args.seed)
                method = setup.build_method(name, {}, stream.batch_size, fresh_copy=True)
                correct = total = 0
                for batch in batches:
                    logits = method.step(batch.images).logits
                    correct += int((logits.argmax(1) == batch.labels).sum())
                    total += len(batch.labels)
                method.close()
                cells.append(f"{100 * correct / total:.1f}")
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
