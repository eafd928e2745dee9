"""Accuracy and speed of every method in bf16 autocast against fp32, on the shared fidelity stream.

The table behind ``tta_cli.methods.precision.BF16_FALLBACKS``: for each shared CIFAR-10 model
(BatchNorm, GroupNorm, LayerNorm) and method, the same stream is adapted with ``--precision fp32``
and ``bf16`` through the library path of ``tta adapt`` (``create_method`` + ``run_stream``), runs
alternating in one process; accuracy, the share of identical predictions and the time ratio.

    python benchmarks/precision.py --images 1024 --methods source,tent,eta,sar --json bf16.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed


def labels(n: int) -> torch.Tensor:
    path = speed.shared_dir() / "fixtures" / "fidelity" / "stream" / "labels.csv"
    with path.open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file"])
    return torch.tensor([int(r["label"]) for r in rows[:n]])


def compare(args: argparse.Namespace, model: str, method: str, truth: torch.Tensor) -> dict[str, object]:
    ns = argparse.Namespace(**{**vars(args), "precision": "fp32", "compile": False})
    base = speed.make_setup(ns, model)
    setups = {p: speed.Setup(base.name, base.model, base.images, base.batch_size, base.device, p, False,
                             base.margin, base.lr) for p in ("fp32", "bf16")}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    preds: dict[str, torch.Tensor] = {}
    for rep in range(args.repeats):
        for p in ("fp32", "bf16") if rep % 2 == 0 else ("bf16", "fp32"):
            run = speed.run_tta(setups[p], method)
            times[p].append(run.seconds)
            preds[p] = run.preds
    acc = {p: float((preds[p] == truth).float().mean()) * 100 for p in preds}
    row = {"model": model, "method": method, "fp32_acc": acc["fp32"], "bf16_acc": acc["bf16"],
           "delta": acc["bf16"] - acc["fp32"],
           "same_predictions": float((preds["fp32"] == preds["bf16"]).float().mean()),
           "bf16_speedup": statistics.median(times["fp32"]) / statistics.median(times["bf16"])}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(speed.SHARED_MODELS))
    p.add_argument("--methods", type=lambda s: s.split(","), default=["source", "tent", "eta", "sar"])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    truth = labels(args.images)
    rows = [compare(args, m, meth, truth) for m in args.models for meth in args.methods]
    print("| model | method | fp32 acc | bf16 acc | bf16 - fp32 | same predictions | bf16 speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['fp32_acc']:.2f} | {r['bf16_acc']:.2f} | {r['delta']:+.2f} "
              f"| {r['same_predictions']:.3f} | {r['bf16_speedup']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
