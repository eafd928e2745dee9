#!/usr/bin/env python3
"""auto's step time against the source model's, on BatchNorm models, in one process.

    python benchmarks/auto_speed.py                                   # CIFAR-10 ResNet-18 BN, B = 64
    python benchmarks/auto_speed.py --model tf_efficientnet_lite0 --batch-size 32 --batches 4

Each method runs from its own copy of the model on the same batches (the shared fidelity stream for
the CIFAR model, else seeded noise in the model's input size: the time does not depend on the
weights); the methods take turns, batch by batch, so that a busy machine slows them alike. Times are
per batch, the median over ``--repeats`` passes of the stream after one warm-up pass; the ratio is
each method's median over the source's. ``--methods`` takes ``tta bench``'s syntax.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from _common import REPO, shared_dir

sys.path.insert(0, str(REPO))

METHODS = "source,auto,auto:bn_source_check=false,auto:bn_stream=off"


def batches(model_name: str, batch_size: int, count: int, shared: str | None, threads: int) -> tuple[object, list]:
    import torch

    from tta_cli.runtime import start_run

    if model_name.startswith("cifar10-"):
        root = shared_dir(shared, f"models/{model_name}/config.json")
        setup = start_run(f"local-dir:{root / 'models' / model_name}", device="cpu", threads=threads)
    else:
        setup = start_run(model_name, pretrained=False, device="cpu", threads=threads)
    size = setup.loaded.data_config["input_size"]
    g = torch.Generator().manual_seed(0)
    return setup, [torch.randn(batch_size, *size, generator=g) for _ in range(count)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cifar10-resnet18-bn")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared", default=None)
    args = ap.parse_args(argv)

    import torch

    from tta_cli.bench.runner import parse_methods

    torch.set_num_threads(args.threads)
    setup, stream = batches(args.model, args.batch_size, args.batches, args.shared, args.threads)
    specs = parse_methods(args.methods)
    methods = {s.label: setup.build_method(s.name, s.hyperparameters, args.batch_size, fresh_copy=True) for s in specs}
    times: dict[str, list[float]] = {label: [] for label in methods}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for x in stream:
                for label, method in methods.items():
                    started = time.perf_counter()
                    method.step(x)
                    if repeat:  # the first pass warms up
                        times[label].append(time.perf_counter() - started)
    source = statistics.median(times[specs[0].label])
    print(f"{args.model}, B = {args.batch_size}, {args.threads} thread(s), median of "
          f"{args.repeats} x {args.batches} batches")
    print("| method | ms per batch | x the first |")
    print("|---|---|---|")
    for label, values in times.items():
        median = statistics.median(values)
        print(f"| {label} | {1000 * median:.1f} | {median / source:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
