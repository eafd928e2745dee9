"""tta_cli.reference: the source reference as a pass of the engine, on all or a sample of the rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import Recorder, csv_rows, invoke, make_images, tiny_timm
from tta_cli.engine import run_stream
from tta_cli.methods import create_method
from tta_cli.methods.base import StepResult
from tta_cli.outputs import BatchOutputs
from tta_cli.reference import (
    REFERENCE_ALL_FIRST,
    REFERENCE_EVERY,
    SourceReference,
    referenced_rows,
    source_reference_for,
)
from tta_cli.sinks.predictions import PredictionsWriter
from tta_cli.sources.items import Batch, StreamItem

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream_rows(mode: str, total: int, batch: int) -> list[int]:
    rows: list[int] = []
    for first in range(0, total, batch):
        n = min(batch, total - first)
        rows += (first + referenced_rows(mode, first, n, batch)).tolist()
    return rows


def test_sampled_rows_are_the_first_images_then_one_batch_in_every() -> None:
    rows = _stream_rows("sampled", 1000, 64)
    expected = [i for i in range(1000) if i < REFERENCE_ALL_FIRST or (i // 64) % REFERENCE_EVERY == 0]
    assert rows == expected and len(rows) == 512 + 64 + 64  # the prefix, then batches 8 and 12 of 16
    assert _stream_rows("all", 100, 7) == list(range(100))
    assert _stream_rows("sampled", 600, 1) == [i for i in range(600) if i < 512 or i % REFERENCE_EVERY == 0]


def test_no_reference_when_off_or_for_a_method_that_does_not_change_predictions() -> None:
    model = tiny_timm()
    assert source_reference_for("off", True, model) is None
    assert source_reference_for("sampled", False, model) is None
    reference = source_reference_for("sampled", True, model)
    assert reference is not None and not reference.complete and reference.model is not model


def _batches(total: int, size: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    batches = []
    for first in range(0, total, size):
        n = min(size, total - first)
        items = [StreamItem(f"{first + i}.png", Path(f"{first + i}.png")) for i in range(n)]
        batches.append(Batch(items, torch.randn(n, 3, 32, 32, generator=g), first))
    return batches


def test_the_engine_runs_the_reference_on_the_sampled_rows_of_the_source_model() -> None:
    model = tiny_timm()
    frozen = tiny_timm().eval()  # the same weights: the source model as it came
    reference = SourceReference(model, "sampled", batch_size=64)
    method = create_method("tent", model, batch_size=64, lr=0.05)
    recorder = Recorder()
    batches = _batches(REFERENCE_ALL_FIRST + 64 * REFERENCE_EVERY, 64)
    totals = run_stream(method, batches, torch.device("cpu"), [recorder], reference=reference)
    assert totals.referenced == REFERENCE_ALL_FIRST + 64
    assert [len(out.source_rows) for out in recorder.outputs[-REFERENCE_EVERY:]] == [64] + [0] * (REFERENCE_EVERY - 1)
    last = recorder.outputs[-REFERENCE_EVERY]
    assert last.source_rows is not None and last.source_logits is not None
    with torch.no_grad():
        expected = frozen(batches[-REFERENCE_EVERY].images)
    assert torch.allclose(last.source_logits, expected, atol=1e-5)  # the source's, not the adapted model's
    assert last.source_pred().tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize("architecture", ["test_resnet", "test_efficientnet_gn"], ids=["batchnorm", "groupnorm"])
def test_the_reference_takes_the_source_logits_a_step_made(monkeypatch: pytest.MonkeyPatch,
                                                            architecture: str) -> None:
    """auto computes the source model's logits in its step (BatchNorm: the source-statistics
    candidate; others: its guard's copy): the reference takes those, with the same outputs as a
    forward of its own."""
    def run(share: bool) -> tuple[list[BatchOutputs], object]:
        model = tiny_timm(architecture)
        reference = SourceReference(model, "all", batch_size=8)
        method = create_method("auto", model, batch_size=8)
        step, shared = method.step, []

        def stepped(x: torch.Tensor) -> StepResult:
            result = step(x)
            shared.append(result.source_logits is not None and len(result.source_logits) == len(x))
            return result if share else dataclasses.replace(result, source_logits=None)

        monkeypatch.setattr(method, "step", stepped)
        recorder = Recorder()
        totals = run_stream(method, _batches(32, 8), torch.device("cpu"), [recorder], reference=reference)
        assert shared == [True] * 4  # every step made the source logits of each of its rows
        return recorder.outputs, totals

    (shared, shared_totals), (own, own_totals) = run(True), run(False)
    for a, b in zip(shared, own, strict=True):
        assert a.source_logits is not None and b.source_logits is not None
        assert torch.equal(a.source_rows, b.source_rows) and torch.allclose(a.source_logits, b.source_logits, atol=1e-5)
        assert torch.equal(a.source_pred(), b.source_pred()) and torch.equal(a.pred, b.pred)
    assert shared_totals.referenced == own_totals.referenced == 32


def test_the_predictions_file_leaves_rows_without_a_reference_empty(tmp_path: Path) -> None:
    n = 4
    items = [StreamItem(f"{i}.png", Path(f"{i}.png")) for i in range(n)]
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    out = BatchOutputs(Batch(items, torch.zeros(n, 3, 2, 2), 0), torch.zeros(n, dtype=torch.long), torch.ones(n),
                       torch.zeros(n), torch.zeros(n, 2, dtype=torch.long), torch.zeros(n, dtype=torch.bool), (),
                       False, 0.0, source_rows=torch.tensor([0, 2]), source_logits=logits)
    writer = PredictionsWriter(tmp_path / "predictions.csv", ["cat", "dog"], source_columns=True)
    writer.on_batch(out)
    writer.close()
    rows = csv_rows(tmp_path / "predictions.csv")
    assert [r["source_pred"] for r in rows] == ["1", "", "0", ""]
    assert [r["source_pred_name"] for r in rows] == ["dog", "", "cat", ""]


TOTAL = REFERENCE_ALL_FIRST + 88 * REFERENCE_EVERY


@pytest.mark.parametrize(("mode", "filled"), [("all", TOTAL), ("sampled", len(_stream_rows("sampled", TOTAL, 88))),
                                              ("off", None)])
def test_adapt_source_reference_modes(tmp_path: Path, tiny_model_dir: Path, mode: str, filled: int | None) -> None:
    make_images(tmp_path / "images", TOTAL, size=8)
    out = tmp_path / "out"
    result = invoke("adapt", tmp_path / "images", "--model", f"local-dir:{tiny_model_dir}", "--method", "tent",
                    "-b", "88", "--out", out, "--workers", "0", "--quiet", "--source-reference", mode)
    assert result.exit_code == 0, result.output
    rows = csv_rows(out / "predictions.csv")
    record = json.loads((out / "run.json").read_text())
    if filled is None:
        assert "source_pred" not in rows[0] and "estimated_accuracy_change" not in record["health"]
        return
    assert sum(r["source_pred"] != "" for r in rows) == filled
    assert record["counts"]["referenced"] == filled and record["config"]["source_reference"] == mode
    assert "estimated_accuracy_change" in record["health"]
