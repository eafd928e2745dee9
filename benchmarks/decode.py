"""Decoding throughput versus adaptation throughput.

Measures, in one process, the median images/s over ``--repeats`` runs of:

* decode: decoding + preprocessing alone (``tta_cli.sources.loader.iter_batches``), with 0, 1, 2...
  worker processes, on ``sample_data/stream`` and on a generated folder of full-size JPEGs;
* adapt: the adaptation step alone (SAR on ``sample_data/model``) on batches decoded beforehand;
* end to end: decoding and adaptation together, as ``tta adapt`` runs them.

Run from the repository root::

    python benchmarks/decode.py                  # 500 JPEGs of 1024x768 under /tmp, 3 repeats
    python benchmarks/decode.py --large 100 --repeats 1 --workers 0 1
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_STREAM = ROOT / "sample_data" / "stream"
SAMPLE_MODEL = ROOT / "sample_data" / "model"


class Result(NamedTuple):
    rate: float
    rates: list[float]
    cores: float
    cpu_ms: float
    """CPU milliseconds per image, all processes together: what a free core would do per image."""


def make_jpegs(folder: Path, n: int, width: int, height: int) -> Path:
    """``n`` photo-like JPEGs (smooth shapes plus grain, quality 90), made once and reused."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 8, (height, width, 3))
        pixels = np.clip(np.asarray(smooth, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text(str(n))
    return folder


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run: Callable[[], int], repeats: int) -> Result:
    """Median images/s of ``run`` (which returns how many images it handled), every rate, and the
    CPU cores busy on average: on a shared machine, what the workers could actually get."""
    rates, cores, cpu_ms = [], [], []
    for _ in range(repeats):
        cpu, start = _cpu_seconds(), time.perf_counter()
        count = run()
        wall, used = time.perf_counter() - start, _cpu_seconds() - cpu
        rates.append(count / wall)
        cores.append(used / wall)
        cpu_ms.append(1000 * used / count)
    return Result(statistics.median(rates), rates, statistics.median(cores), statistics.median(cpu_ms))


def decode_only(items: list, transform: Callable, batch_size: int, workers: int) -> int:
    from tta_cli.sources.loader import iter_batches

    return sum(len(b.items) for b in iter_batches(items, transform, batch_size, workers))


def adapt_on(method: object, batches: Iterable[torch.Tensor]) -> int:
    count = 0
    for images in batches:
        method.step(images)  # type: ignore[attr-defined]
        count += len(images)
    return count


def new_method(setup: object, batch_size: int) -> object:
    """SAR on a copy of the model, built as ``tta adapt`` builds it (``RunSetup.build_method``)."""
    return setup.build_method("sar", {}, batch_size, fresh_copy=True)  # type: ignore[attr-defined]


def end_to_end(setup: object, items: list, transform: Callable, batch_size: int, workers: int) -> int:
    from tta_cli.sources.loader import iter_batches

    method = new_method(setup, batch_size)
    batches = iter_batches(items, transform, batch_size, workers)
    return adapt_on(method, (b.images for b in batches if b.items))


Row = tuple[str, str, str, Result]


def show(row: Row) -> None:
    data, transform, what, result = row
    print(f"{data} | {transform} | {what}: {result.rate:.1f} images/s, {result.cores:.2f} cores busy, "
          f"{result.cpu_ms:.2f} CPU ms/image", flush=True)


def report(rows: list[Row]) -> None:
    print("\n| data | transform | what | images/s (median) | runs | CPU cores busy | CPU ms/image |")
    print("|---|---|---|---:|---|---:|---:|")
    for data, transform, what, r in rows:
        runs = ", ".join(f"{rate:.1f}" for rate in r.rates)
        print(f"| {data} | {transform} | {what} | {r.rate:.1f} | {runs} | {r.cores:.2f} | {r.cpu_ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=500, help="JPEGs in the generated folder")
    parser.add_argument("--size", default="1024x768", help="their width x height")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/tta-decode-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process")
    args = parser.parse_args()

    import timm.data

    from tta_cli.runtime import start_run
    from tta_cli.sources import folder_items
    from tta_cli.sources.loader import iter_batches

    if args.threads:
        torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads in the main process, load average {os.getloadavg()}",
          flush=True)
    setup = start_run(f"local-dir:{SAMPLE_MODEL}", threads=args.threads)
    loaded = setup.loaded
    transforms = {
        "model (32 px)": loaded.transform(),
        "224 px": timm.data.create_transform(input_size=224, crop_pct=0.875, interpolation="bilinear"),
    }
    large = make_jpegs(args.folder / f"jpeg-{width}x{height}-{args.large}", args.large, width, height)
    sample = folder_items(SAMPLE_STREAM, [])
    datasets = {
        f"sample_data/stream ({len(sample)} PNG, 32x32)": sample,
        f"{args.large} JPEG {width}x{height}": folder_items(large, []),
    }
    rows = []
    for data, items in datasets.items():
        decode_only(items, transforms["model (32 px)"], args.batch_size, 0)  # warm the page cache
        for name, transform in transforms.items():
            for workers in args.workers:
                job = functools.partial(decode_only, items, transform, args.batch_size, workers)
                rows.append((data, name, f"decode, {workers} workers", measure(job, args.repeats)))
                show(rows[-1])

    items = datasets[next(iter(datasets))]
    transform = transforms["model (32 px)"]
    batches = [b.images for b in iter_batches(items, transform, args.batch_size, 0)]
    result = measure(lambda: adapt_on(new_method(setup, args.batch_size), batches), args.repeats)
    rows.append(("sample_data/stream", "model (32 px)", "adapt alone (SAR, convnext_atto)", result))
    show(rows[-1])
    for data, items in datasets.items():
        for workers in args.workers:
            job = functools.partial(end_to_end, setup, items, transform, args.batch_size, workers)
            rows.append((data, "model (32 px)", f"decode + adapt, {workers} workers", measure(job, args.repeats)))
            show(rows[-1])
    report(rows)
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
