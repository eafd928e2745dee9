"""``verdict.py table``: the label-free estimate and verdict of every collected run against the
truth, the rule's own part (fit) and the held-out part reported separately."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import REPO

sys.path.insert(0, str(REPO))

from verdict import NEW_METHODS, is_second_wave

from tta_cli.trust import Judgement, judge

HARM = -3.0
"""A run that lost this many points (or more) must be flagged; one that gained 3 must not."""


def load_runs(out: Path, reference: str = "sampled") -> list[tuple[dict, Judgement, float]]:
    """(index row, the label-free judgement, the true change in points) for every run."""
    rows = []
    for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        data = np.load(out / "runs" / f"{row['name']}.npz")
        source, adapted = torch.from_numpy(data["source"]), torch.from_numpy(data["adapted"])
        labels = torch.from_numpy(data["labels"])
        correct = (adapted.argmax(1) == labels).double().mean() - (source.argmax(1) == labels).double().mean()
        truth = 100 * float(correct)
        rows.append((row, judge(source, adapted, row["batch_size"], reference), truth))
    return rows


def summary(runs: list[tuple[dict, Judgement, float]]) -> dict[str, float | int | str]:
    harmed = [j for _, j, t in runs if t <= HARM]
    helped = [j for _, j, t in runs if t >= -HARM]
    big = [(j, t) for _, j, t in runs if abs(t) >= -HARM]
    errors = np.array([j.estimated_change - t for _, j, t in runs])
    return {
        "runs": len(runs),
        "lost >= 3": len(harmed),
        "flagged": sum(j.flags_harm for j in harmed),
        "gained >= 3": len(helped),
        "false alarms": sum(j.flags_harm for j in helped),
        "sign right (|change| >= 3)": f"{sum((j.estimated_change > 0) == (t > 0) for j, t in big)}/{len(big)}",
        "median |error|": round(float(np.median(np.abs(errors))), 2) if len(errors) else 0.0,
        "90th pct |error|": round(float(np.percentile(np.abs(errors), 90)), 2) if len(errors) else 0.0,
        "truth inside interval": f"{sum(j.low <= t <= j.high for _, j, t in runs)}/{len(runs)}",
    }


def groups(row: dict) -> list[str]:
    """The held-out parts' subsets reported apart: the first wave, the second wave by what it adds, the
    third wave by model."""
    if row["part"] == "third":
        return ["  third: EfficientNet-Lite0 (ImageNet)" if row["model"] == "lite0" else "  third: CIFAR-10 models"]
    if row["part"] != "held-out":
        return []
    if not is_second_wave(row):
        return ["held-out: first wave"]
    names = ["held-out: second wave"]
    names += ["  EfficientNet-Lite0 (ImageNet)"] if row["model"] == "lite0" else []
    names += ["  batch size 1-8"] if row["batch_size"] < 16 else []
    names += ["  cotta, eata, zerosiam, come, foa_shift"] if row["method"] in NEW_METHODS else []
    return names


def print_auto(runs: list[tuple[dict, Judgement, float]]) -> None:
    """auto's true change against the source on every cell of the second and third waves (its
    target: never below -0.5)."""
    for wave, in_wave in (("second", is_second_wave), ("third", lambda row: row["part"] == "third")):
        autos = sorted((t, row["name"]) for row, _, t in runs if row["method"] == "auto" and in_wave(row))
        if autos:
            print(f"auto on the {wave} wave's {len(autos)} cells: worst {autos[0][0]:+.1f} points ({autos[0][1]}); "
                  + ", ".join(f"{name} {t:+.1f}" for t, name in autos))
            print()


def print_tables(out: Path, reference: str = "sampled") -> None:
    runs = load_runs(out, reference)
    by_part: dict[str, list] = defaultdict(list)
    for run in runs:
        by_part[run[0]["part"]].append(run)
        for group in groups(run[0]):
            by_part[group].append(run)
    keys = list(summary(runs))
    print("| part | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for part, part_runs in by_part.items():
        s = summary(part_runs)
        print(f"| {part} | " + " | ".join(str(s[k]) for k in keys) + " |")
    print()
    print_auto(runs)
    print("| run | source | adapted | true change | estimate | interval | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row, j, truth in sorted(runs, key=lambda r: r[2]):
        if abs(truth) >= -HARM or j.flags_harm:
            print(f"| {row['name']} | {100 * row['source_accuracy']:.1f} | {100 * row['accuracy']:.1f} | "
                  f"{truth:+.1f} | {j.estimated_change:+.1f} | {j.low:+.1f}..{j.high:+.1f} | {j.verdict} |")
