"""Peak memory and speed of any registered methods on the shared CIFAR-10 models, each run in its
own process (the library path of ``tta adapt``: ``create_method`` + ``run_stream``).

    python benchmarks/methods_memory.py --methods source,tent,sar,come,zerosiam,foa_shift --threads 1

Per model and method: a fresh process loads the model and the first ``--images`` images of the
shared fidelity stream (mixed corruptions), notes its resident set, builds the method (foa_shift:
its source statistics from ``fidelity/clean``, 256 images), runs the stream at ``--batch-size``
and reports images per adaptation second and the resident-set high-water mark above the memory in
use before the method was built (``VmHWM`` reset through ``/proc/self/clear_refs``, as
``benchmarks/speed.py`` measures it; Linux only). Method defaults throughout (paper learning rates).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = ("cifar10-resnet18-gn", "cifar10-convnext-atto-ln", "cifar10-resnet18-bn")


def _images(model: torch.nn.Module, folder: Path, limit: int) -> torch.Tensor:
    import csv

    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    with (folder / "labels.csv").open(newline="") as f:
        files = [row["file"] for row in csv.DictReader(f)][:limit]
    return torch.stack([transform(Image.open(folder / name).convert("RGB")) for name in files])


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def one(model_name: str, method_name: str, images: int, batch_size: int) -> dict[str, float | str]:
    import timm

    from tta_cli.methods import create_method

    model = timm.create_model(f"local-dir:{SHARED / 'models' / model_name}", pretrained=True)
    stream = _images(model, SHARED / "fixtures" / "fidelity" / "stream", images)
    clean = _images(model, SHARED / "fixtures" / "fidelity" / "clean", 256) if method_name == "foa_shift" else None
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set (Linux)
    before = _status_mib("VmRSS")
    method = create_method(method_name, model, batch_size=batch_size)
    if clean is not None:
        method.compute_source_statistics(clean.split(64))
    started = time.perf_counter()
    for batch in stream.split(batch_size):
        method(batch)
    seconds = time.perf_counter() - started
    return {"model": model_name, "method": method_name, "img_per_s": stream.shape[0] / seconds,
            "peak_mib_above_model": _status_mib("VmHWM") - before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default="source,tent,come,zerosiam,foa_shift")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        model_name, method_name = args.one.split(":")
        print(json.dumps(one(model_name, method_name, args.images, args.batch_size)))
        return
    print("| model | method | img/s | peak MiB above the model |\n|---|---|---|---|")
    for model_name in args.models.split(","):
        for method_name in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", f"{model_name}:{method_name}",
                                  "--images", str(args.images), "--batch-size", str(args.batch_size),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row = f"| {model_name} | {method_name} | {r['img_per_s']:.0f} | {r['peak_mib_above_model']:.0f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
