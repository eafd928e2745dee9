"""On CUDA: ``tta adapt`` in bf16 completes and predicts as the fp32 CPU run does (within tolerance).

bf16 autocast changes the last bits of every forward, so SAR's trajectory drifts a little from the
CPU's; on the bundled sample (a trained CIFAR-10 ConvNeXt, 320 images) the predictions must still
agree almost everywhere and the accuracy within two points.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import csv_rows, invoke

pytestmark = pytest.mark.gpu
SAMPLE = ROOT / "sample_data"


def _adapt(out: Path, *flags: str) -> list[dict[str, str]]:
    stream = SAMPLE / "stream"
    result = invoke("adapt", stream, "--labels", stream / "labels.csv", "--model", f"local-dir:{SAMPLE / 'model'}",
                    "--method", "sar", "--batch-size", "64", "--out", out, "--quiet", "--workers", "2", *flags)
    assert result.exit_code == 0, result.output
    return csv_rows(out / "predictions.csv")


def test_bf16_on_cuda_predicts_as_fp32_on_the_cpu(tmp_path: Path) -> None:
    cpu = _adapt(tmp_path / "cpu", "--device", "cpu")
    cuda = _adapt(tmp_path / "cuda", "--device", "cuda", "--precision", "bf16")
    assert [r["path"] for r in cuda] == [r["path"] for r in cpu]
    same = sum(a["pred"] == b["pred"] for a, b in zip(cuda, cpu, strict=True)) / len(cpu)
    assert same >= 0.95, f"only {same:.1%} of the bf16 CUDA predictions equal the CPU's"
    accuracy = [sum(r["correct"] == "1" for r in rows) / len(rows) for rows in (cpu, cuda)]
    assert abs(accuracy[0] - accuracy[1]) <= 0.02
    record = json.loads((tmp_path / "cuda" / "run.json").read_text())
    assert record["device"].startswith("cuda") and record["method"]["performance"]["precision"] == "bf16"
    assert record["timing"]["device_idle_share"] is not None
