"""Speed of ``tta predict``'s loop against a plain timm inference loop on the same decoded batches.

The stream is decoded once, with the model's own transform, into batches kept in memory; then, in
one process and alternating (plain, tta, tta, plain, ...), the same batches go through

* plain: ``model.eval()`` and ``model(x).argmax(1)`` under ``torch.no_grad()``, nothing else;
* tta: what ``tta predict`` runs after decoding: the ``source`` method through ``run_stream`` (the
  engine: device transfer, softmax, entropy, top-5, totals) into the predictions writer (CSV).

Decoding is left out of both (it is the same code for every consumer and dominates on small
images). The report gives each loop's median seconds, images/s and the ratio tta / plain, and
whether the two predict the same classes.

    python benchmarks/predict_speed.py                          # sample_data, CPU, B=64
    python benchmarks/predict_speed.py --inputs DIR --model M --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tta_cli.engine import run_stream
from tta_cli.runtime import start_run
from tta_cli.sinks.predictions import PredictionsWriter
from tta_cli.sources import collect_stream
from tta_cli.sources.items import Batch

ROOT = Path(__file__).resolve().parents[1]


def decoded_batches(inputs: Path, model: str, batch_size: int, device: str) -> tuple[object, list[Batch]]:
    setup = start_run(model, device=device)
    stream = collect_stream([inputs], setup.loaded.class_names)
    try:
        batches = [b for b in setup.batches(stream, batch_size, workers=0) if b.items]
    finally:
        stream.close()
    return setup, batches


@torch.no_grad()
def plain_loop(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    preds = [model(b.images.to(device)).argmax(1).cpu() for b in batches]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, torch.cat(preds)


def tta_loop(setup: object, batches: list[Batch], folder: Path) -> tuple[float, torch.Tensor]:
    loaded, device = setup.loaded, setup.device  # type: ignore[attr-defined]
    method = setup.build_method("source", {}, len(batches[0].items))  # type: ignore[attr-defined]
    writer = PredictionsWriter(folder / "predictions.csv", loaded.class_names)
    started = time.perf_counter()
    run_stream(method, batches, device, [writer])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    writer.close()
    method.close()
    with (folder / "predictions.csv").open() as f:
        next(f)
        preds = torch.tensor([int(line.split(",")[4]) for line in f])
    return seconds, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, default=ROOT / "sample_data" / "stream")
    parser.add_argument("--model", default=f"local-dir:{ROOT / 'sample_data' / 'model'}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each loop (alternating).")
    args = parser.parse_args()

    setup, batches = decoded_batches(args.inputs, args.model, args.batch_size, args.device)
    model = setup.loaded.model.to(setup.device).eval()  # type: ignore[attr-defined]
    images = sum(len(b.items) for b in batches)
    plain_loop(model, batches[:1], setup.device)  # type: ignore[attr-defined]  # warm-up
    times: dict[str, list[float]] = {"plain": [], "tta": []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = ("plain", "tta") if r % 2 == 0 else ("tta", "plain")
            preds = {}
            for name in order:
                if name == "plain":
                    seconds, preds[name] = plain_loop(model, batches, setup.device)  # type: ignore[attr-defined]
                else:
                    seconds, preds[name] = tta_loop(setup, batches, Path(tmp))
                times[name].append(seconds)
            same = same and torch.equal(preds["plain"], preds["tta"])
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "inputs": str(args.inputs), "model": args.model, "device": args.device, "batch_size": args.batch_size,
        "images": images, "repeats": args.repeats,
        "median_seconds": medians,
        "images_per_second": {name: images / s for name, s in medians.items()},
        "ratio_tta_over_plain": medians["tta"] / medians["plain"],
        "same_predictions": same,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
