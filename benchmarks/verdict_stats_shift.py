#!/usr/bin/env python3
"""A label-free signal measured for the verdict and dropped (docs/TRUST.md, "A third signal"): per
stream of ``verdict.py collect`` (BatchNorm models: the CIFAR-10 ResNet-18 and EfficientNet-Lite0),
how far the test batches' BatchNorm statistics are from the source model's running statistics,
against their own sampling noise, printed next to each method's true accuracy change.

Per BatchNorm layer and batch, with the even and the odd rows as two half-batches:
R = 4 KL(batch, running) / KL(half, other half) (per channel, symmetric, Gaussian; about 1 for a
batch drawn from the source's own distribution). A stream's R is the median over layers of the
mean over its batches (``R_pooled``: the sums over layers instead).

    python benchmarks/verdict.py collect --part held-out --only lite0,bn --methods norm,tent,sar
    python benchmarks/verdict_stats_shift.py --out runs/verdict
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from _common import REPO, cache_dir, shared_dir

sys.path.insert(0, str(REPO))


def symmetric_kl(m1, v1, m2, v2):
    v1, v2 = v1.clamp_min(1e-8), v2.clamp_min(1e-8)
    forward = 0.5 * (v1 / v2 + (m1 - m2) ** 2 / v2 - 1 + (v2 / v1).log())
    backward = 0.5 * (v2 / v1 + (m1 - m2) ** 2 / v1 - 1 + (v1 / v2).log())
    return (forward + backward) / 2


def moments(x):
    flat = x.float().transpose(0, 1).flatten(1)  # (channels, values)
    return flat.mean(1), flat.var(1, unbiased=False)


def stream_ratios(setup, items: list, batch_size: int) -> tuple[float, float]:
    """(R: median over layers, R_pooled) of one stream through the source model."""
    import torch

    from tta_cli.methods.selection import batchnorm_layers

    per_batch: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []

    def hook(module, inputs) -> None:
        x = inputs[0]
        batch, even, odd = moments(x), moments(x[0::2]), moments(x[1::2])
        shift = symmetric_kl(*batch, module.running_mean.float(), module.running_var.float()).mean()
        current.append((float(shift), float(symmetric_kl(*even, *odd).mean())))

    handles = [layer.register_forward_pre_hook(hook) for layer in batchnorm_layers(setup.loaded.model)]
    model = setup.loaded.model.eval()
    for batch in setup.batches(items, batch_size):
        if len(batch.items) >= 4:
            current.clear()
            with torch.no_grad():
                model(batch.images)
            per_batch.append(list(current))
    for handle in handles:
        handle.remove()
    values = np.array(per_batch).mean(0)  # (layers, 2)
    shift, noise = values[:, 0], values[:, 1]
    return float(np.median(4 * shift / noise)), float(4 * shift.sum() / noise.sum())


def main() -> int:
    import torch
    import verdict
    from cifar10_wild import extract_cifar

    from tta_cli.runtime import start_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/verdict", help="verdict.py collect's --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shared", default=None)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shared, cache = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz"), cache_dir(args.cache)
    test, _ = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, 500)
    changes: dict[tuple, dict[str, float]] = {}
    for line in (Path(args.out) / "index.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["model"] in ("bn", "lite0") and row["batch_size"] >= 4:
            key = (row["part"], row["model"], row["data"], row["order"], row["batch_size"], row["seed"])
            changes.setdefault(key, {})[row["method"]] = 100 * (row["accuracy"] - row["source_accuracy"])
    setups: dict[str, object] = {}
    print("| part | model | data | order | B | R | R_pooled | true change per method |")
    print("|---|---|---|---|---|---|---|---|")
    for key, by_method in sorted(changes.items()):
        part, model, data, order, batch_size, seed = key
        if model not in setups:
            folder = verdict.inet_paths(shared_dir(args.shared, "data/imagenet-sample-256.tar.gz"), cache)[0] \
                if model == "lite0" else shared / "models" / verdict.MODELS[model]
            setups[model] = start_run(f"local-dir:{folder}", device="cpu")
        setup = setups[model]
        spec = verdict.RunSpec(part, model, data, order, "norm", batch_size, seed)
        r, pooled = stream_ratios(setup, verdict.stream_items(spec, setup.loaded.class_names, test, cache), batch_size)
        methods = ", ".join(f"{name} {change:+.1f}" for name, change in sorted(by_method.items()))
        print(f"| {part} | {model} | {data} | {order} | {batch_size} | {r:.2f} | {pooled:.2f} | {methods} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
