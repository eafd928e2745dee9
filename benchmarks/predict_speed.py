"""Speed of ``tta predict``'s loop against a plain timm inference loop on the same decoded batches.

The stream is decoded once, with the model's own transform, into batches kept in memory; then, in
one process and alternating (plain, tta, tta, plain, ...), the same batches go through

* plain: ``model.eval()`` and ``model(x).argmax(1)`` under ``torch.no_grad()``, nothing else;
* tta: what ``tta predict`` runs after decoding: the ``source`` method through ``run_stream`` (the
  engine: device transfer, softmax, entropy, top-5, totals) into the predictions writer (CSV).

Decoding is left out of both (it is the same code for every consumer and dominates on small
images). The report gives each loop's median seconds, images/s and the ratio tta / plain, and
whether the two predict the same classes.

``--end-to-end`` times the whole job instead, decoding included: a plain timm script (the model
from ``timm.create_model``, its ``resolve_data_config`` transform, PIL decoding of the sorted files
in the loop, ``model(x).argmax(1)``) against the library call of ``tta predict``
(``tta_cli.run.predict``: model loading, the folder as a stream, decoding workers, the engine,
``predictions.csv`` and ``run.json``), alternating in one process.

    python benchmarks/predict_speed.py                          # sample_data, CPU, B=64
    python benchmarks/predict_speed.py --inputs DIR --model M --device cuda --repeats 5
    python benchmarks/predict_speed.py --end-to-end --inputs /tmp/perf/c10k \
        --model local-dir:../shared/models/cifar10-resnet18-bn --repeats 3
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


@torch.no_grad()
def plain_script(inputs: Path, model_spec: str, batch_size: int) -> tuple[float, torch.Tensor]:
    """A user's plain timm inference script over a folder, decoding included."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    started = time.perf_counter()
    model = timm.create_model(model_spec, pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    files = sorted(p for p in inputs.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    preds = []
    for start in range(0, len(files), batch_size):
        x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files[start:start + batch_size]])
        preds.append(model(x).argmax(1))
    return time.perf_counter() - started, torch.cat(preds)


def tta_predict(inputs: Path, model_spec: str, batch_size: int, out: Path) -> tuple[float, torch.Tensor]:
    from tta_cli.config import AdaptConfig
    from tta_cli.run import predict

    started = time.perf_counter()
    predict(AdaptConfig(inputs=[inputs], model=model_spec, out=out, overwrite=True, quiet=True,
                        batch_size=batch_size, labels_from_folders="off"))
    seconds = time.perf_counter() - started
    with (out / "predictions.csv").open() as f:
        next(f)
        preds = torch.tensor([int(line.split(",")[4]) for line in f])
    return seconds, preds


def end_to_end(args: argparse.Namespace) -> dict[str, object]:
    times: dict[str, list[float]] = {"plain": [], "tta": []}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats + 1):  # the first round warms the caches and is not counted
            order = ("plain", "tta") if r % 2 == 0 else ("tta", "plain")
            preds = {}
            for name in order:
                seconds, preds[name] = (plain_script(args.inputs, args.model, args.batch_size) if name == "plain"
                                        else tta_predict(args.inputs, args.model, args.batch_size, Path(tmp) / "out"))
                if r:
                    times[name].append(seconds)
            same = same and torch.equal(preds["plain"], preds["tta"])
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"inputs": str(args.inputs), "model": args.model, "batch_size": args.batch_size, "images": len(preds["tta"]),
            "repeats": args.repeats, "seconds": times, "median_seconds": medians,
            "speed_tta_over_plain": medians["plain"] / medians["tta"], "same_predictions": same,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=Path, default=ROOT / "sample_data" / "stream")
    parser.add_argument("--model", default=f"local-dir:{ROOT / 'sample_data' / 'model'}")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="Runs of each loop (alternating).")
    parser.add_argument("--end-to-end", action="store_true", help="decoding and model loading included")
    args = parser.parse_args()
    if args.end_to_end:
        print(json.dumps(end_to_end(args), indent=2))
        return

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
