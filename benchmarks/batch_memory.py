"""Images/s and peak memory of one adaptation pass (forward + entropy backward on the norm
parameters) at several batch sizes at 224 px, whole and in micro-batches, each in its own process.

    python benchmarks/batch_memory.py --model convnext_atto --sizes 16,64,128 --micro 128:16

Random weights (the cost does not depend on them). Peak memory: the process's resident-set
high-water mark (``ru_maxrss``), model and inputs included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def one(model_name: str, batch: int, micro: int | None, steps: int) -> dict[str, float]:
    import timm

    from tta_cli.methods.base import softmax_entropy
    from tta_cli.methods.fastpaths import micro_batched_backward

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    params = [p for n, p in model.named_parameters() if "norm" in n or ".bn" in n]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    x = torch.randn(batch, 3, 224, 224)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if micro:
            micro_batched_backward(lambda c: (lambda lg: (lg, softmax_entropy(lg)))(model(c)), x, micro, params)
        else:
            softmax_entropy(model(x)).mean().backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    return {"batch": batch, "micro": micro or batch, "images_per_second": batch * steps / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="convnext_atto")
    p.add_argument("--sizes", default="16,64,128")
    p.add_argument("--micro", default="128:16", help="BATCH:MICRO pairs, comma-separated")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        batch, micro = (int(v) for v in args.one.split(":"))
        print(json.dumps(one(args.model, batch, micro if micro != batch else None, args.steps)))
        return
    runs = [f"{b}:{b}" for b in args.sizes.split(",")] + [m for m in args.micro.split(",") if m]
    rows = []
    for run in runs:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                              "--one", run], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"| {args.model} batch | micro-batch | img/s | peak RSS MiB |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['micro']} | {r['images_per_second']:.1f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
