"""Every registered method's predictions on the fidelity stream, to show a refactoring changed none.

    python benchmarks/predictions_snapshot.py --out /tmp/before.json
    python benchmarks/predictions_snapshot.py --out /tmp/after.json --compare /tmp/before.json

For each method, model (the shared CIFAR-10 ResNet-18 with BatchNorm and with GroupNorm) and batch
size (16, 64), the per-image predicted classes in stream order, the reset batches and a sha256 of
the adapted state dict (the model's and any extra export) are recorded; ``--compare`` lists every
case whose record differs. Slow methods run on a prefix of the stream (``PREFIX``). One CPU thread,
fp32, the methods' default hyperparameters (EATA with its Fisher on the fixture's clean images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import shared_dir
from tta_cli.methods import list_methods
from tta_cli.runtime import RunSetup, SpeedOptions, start_run
from tta_cli.sources.items import StreamItem

MODELS = ("cifar10-resnet18-bn", "cifar10-resnet18-gn")
BATCH_SIZES = (16, 64)
PREFIX = {"cotta": 128, "rotta": 256, "deyo": 512, "rdumb": 512}
"""Images of the stream for the methods that are slow on two CPU cores (default: all 1,024)."""


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def images(setup: RunSetup, files: list[Path]) -> torch.Tensor:
    batches = setup.batches([StreamItem(f.name, f) for f in files], 256)
    x = torch.cat([b.images for b in batches])
    assert len(x) == len(files), f"decoded {len(x)} of {len(files)} images"
    return x


def run_case(setup: RunSetup, method: str, x: torch.Tensor, batch_size: int, clean: list[Path]) -> dict:
    fishers = None
    if method == "eata":
        fishers, _ = setup.prepare("eata", [StreamItem(f.name, f) for f in clean], batch_size)
    adapter = setup.build_method(method, {}, batch_size, fishers, fresh_copy=True)
    adapter.reseed(0)
    preds = []
    for first in range(0, len(x), batch_size):
        preds += adapter.step(x[first:first + batch_size]).logits.argmax(1).tolist()
    adapter.settle()
    exported = adapter.adapted_state_dict()
    for name, extra in adapter.extra_exports().items():
        exported |= {f"{name}/{k}": v for k, v in extra.items()}
    exported |= {f"stream/{k}": v for k, v in adapter.stream_bn_statistics().items()}
    record = {"images": len(x), "preds": preds, "resets": list(adapter.resets), "state": state_hash(exported)}
    adapter.close()
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None)
    ap.add_argument("--shared", default=None)
    args = ap.parse_args()
    shared = shared_dir(args.shared, "fixtures/fidelity/stream/labels.csv")
    torch.set_num_threads(1)
    fixture = shared / "fixtures" / "fidelity"
    stream = sorted((fixture / "stream").glob("*.png"))
    clean = sorted((fixture / "clean").glob("*.png"))
    results: dict[str, dict] = {}
    for model in MODELS:
        setup = start_run(f"local-dir:{shared / 'models' / model}", device="cpu", threads=1,
                          speed=SpeedOptions(precision="fp32", channels_last="off"))
        x = images(setup, stream)
        for method in args.methods or list_methods():
            for batch_size in BATCH_SIZES:
                started = time.perf_counter()
                case = f"{model}/{method}/b{batch_size}"
                results[case] = run_case(setup, method, x[:PREFIX.get(method, len(x))], batch_size, clean)
                print(f"{case}: {time.perf_counter() - started:.1f}s {results[case]['state']}", flush=True)
    args.out.write_text(json.dumps(results))
    if args.compare:
        before = json.loads(args.compare.read_text())
        differ = [case for case in before if results.get(case) != before[case]]
        missing = [case for case in before if case not in results]
        print(f"{len(before) - len(differ)} of {len(before)} cases identical; differ: {differ}; missing: {missing}")


if __name__ == "__main__":
    main()
