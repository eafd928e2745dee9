"""What the source reference (the collapse guard, the change estimate, the verdict) costs a run.

``tta adapt`` runs whole processes on one folder with ``--source-reference all``, ``sampled`` (the
default) and ``off``, interleaved, and reads each run's own ``run.json``: the seconds of its loop,
and of those the reference's pass (``timing.reference_seconds``, timed around the pass itself, so
the share is measured inside one run and does not depend on what else the machine does). The
report gives, per mode, the median whole-process seconds, the reference's share of the loop and of
the process, and whether the predictions equal ``off``'s (the reference never changes them).

    python benchmarks/reference_cost.py --folder /tmp/perf/c10k \\
        --model local-dir:../shared/models/cifar10-resnet18-gn --method sar --repeats 3
    python benchmarks/reference_cost.py --folder /tmp/perf/c2k \\
        --model local-dir:/tmp/tta-bench-cache/tf_efficientnet_lite0-pypi --method sar --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("all", "sampled", "off")


def run(folder: Path, model: str, method: str, batch_size: int, mode: str, out: Path,
        extra: list[str]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "tta_cli", "adapt", str(folder), "--model", model, "--method", method,
               "--batch-size", str(batch_size), "--source-reference", mode, "--out", str(out), "--overwrite",
               "--quiet", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started, json.loads((out / "run.json").read_text())


def predictions(out: Path) -> list[str]:
    with (out / "predictions.csv").open(newline="") as f:
        return [row["pred"] for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", default="sar")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tta-reference-cost"))
    parser.add_argument("extra", nargs="*", help="further tta adapt options (after --)")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for rep in range(args.repeats):
        for mode in MODES if rep % 2 == 0 else tuple(reversed(MODES)):
            seconds, record = run(args.folder, args.model, args.method, args.batch_size, mode,
                                  args.work / mode, args.extra)
            timing = record["timing"]
            rows[mode].append({"process_seconds": seconds, "loop_seconds": timing["seconds"],
                               "reference_seconds": timing["reference_seconds"],
                               "referenced": record["counts"]["referenced"], "images": record["counts"]["images"]})
            print(f"  {mode} rep {rep}: {seconds:.1f} s", file=sys.stderr, flush=True)
    base = predictions(args.work / "off")
    report = {"folder": str(args.folder), "model": args.model, "method": args.method, "batch_size": args.batch_size,
              "repeats": args.repeats, "modes": {}}
    for mode, runs in rows.items():
        process = statistics.median(r["process_seconds"] for r in runs)
        reference = statistics.median(r["reference_seconds"] for r in runs)
        loop = statistics.median(r["loop_seconds"] for r in runs)
        report["modes"][mode] = {
            "process_seconds": [round(r["process_seconds"], 2) for r in runs],
            "median_process_seconds": round(process, 2), "median_loop_seconds": round(loop, 2),
            "median_reference_seconds": round(reference, 2),
            "reference_share_of_loop": round(reference / loop, 4),
            "reference_share_of_process": round(reference / process, 4),
            "referenced": runs[0]["referenced"], "images": runs[0]["images"],
            "same_predictions_as_off": predictions(args.work / mode) == base,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
