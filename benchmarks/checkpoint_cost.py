"""What one ``--resume`` checkpoint costs: seconds to gather and write it, and its size on disk.

Each case builds a method on a model as ``tta adapt`` does, adapts it on a few random batches, then
writes checkpoints through the run's own ``Checkpointer`` (state gathered by the method, temporary
file, fsync, rename) in two ways, alternating: every tensor of the method (``full``: what every
checkpoint held before 8 Dec 2026) and only the tensors that may have changed since the method was
built (``changed``: the default, ``tta_cli.methods.resume.changed_tensors``). The median of
``--repeats`` writes per way.

    python benchmarks/checkpoint_cost.py
    python benchmarks/checkpoint_cost.py --cases vit_base_patch16_224:sar --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import shared_dir
from tta_cli.checkpoint import CHECKPOINT, Checkpointer
from tta_cli.methods import create_method
from tta_cli.outputs import Totals

DEFAULT_CASES = ("cifar10-resnet18-gn:sar", "cifar10-resnet18-gn:auto", "cifar10-resnet18-bn:auto",
                 "vit_base_patch16_224:sar", "vit_base_patch16_224:auto")


def build(shared: Path, model_name: str, method_name: str, batch_size: int) -> tuple[torch.nn.Module, int]:
    import timm

    folder = shared / "models" / model_name
    if folder.is_dir():
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    else:  # random weights: the size is what matters here
        model = timm.create_model(model_name, pretrained=False)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return create_method(method_name, model, batch_size=batch_size), size


def write_seconds(out: Path, method: torch.nn.Module, repeats: int) -> tuple[list[float], list[float], int, int]:
    """(full seconds, changed seconds, full bytes, changed bytes)."""
    (out / "predictions.csv").touch()
    (out / "errors.csv").touch()
    checkpointer = Checkpointer(out, lambda: {"method": method.state_for_resume(), "sinks": {}},
                                (out / "predictions.csv", out / "errors.csv"), every=1, totals=Totals())
    marks = method.inner._initial_tensors if hasattr(method, "inner") else method._initial_tensors
    holder = method.inner if hasattr(method, "inner") else method
    times: dict[str, list[float]] = {"full": [], "changed": []}
    sizes: dict[str, int] = {}
    for _ in range(repeats):
        for way in ("full", "changed"):
            holder._initial_tensors = None if way == "full" else marks
            started = time.perf_counter()
            checkpointer.save()
            times[way].append(time.perf_counter() - started)
            sizes[way] = (out / CHECKPOINT).stat().st_size
    holder._initial_tensors = marks
    return times["full"], times["changed"], sizes["full"], sizes["changed"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help="model:method,...")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--shared", help="../shared, for its CIFAR-10 models")
    args = parser.parse_args()
    shared = shared_dir(args.shared, "models/cifar10-resnet18-gn/config.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| model | method | full: MB, s (median) | changed only: MB, s (median) | speed-up |")
    print("|---|---|---|---|---|")
    for case in args.cases.split(","):
        model_name, method_name = case.split(":")
        torch.manual_seed(0)
        method, size = build(shared, model_name, method_name, args.batch_size)
        method.mark_initial_tensors()
        for _ in range(args.batches):
            method.step(torch.randn(args.batch_size, 3, size, size))
        with tempfile.TemporaryDirectory() as folder:
            full, changed, full_bytes, changed_bytes = write_seconds(Path(folder), method, args.repeats)
        f, c = statistics.median(full), statistics.median(changed)
        print(f"| {model_name} | {method_name} | {full_bytes / 1e6:.1f} MB, {f:.3f} s | "
              f"{changed_bytes / 1e6:.2f} MB, {c:.4f} s | {f / c:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
