"""tta_cli.monitor: label-free collapse detection, the source reference and the health verdict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import csv_rows, invoke, make_images
from tta_cli.collapse_window import Thresholds, effective_classes
from tta_cli.monitor import (
    HARM_ADVICE,
    MANY_CLASSES,
    UNVALIDATED_ADVICE,
    CollapseMonitor,
    CollapseStop,
    health_verdict,
)
from tta_cli.outputs import BatchOutputs
from tta_cli.reference import SourceReference
from tta_cli.run import CollapseActions
from tta_cli.sources.items import Batch, StreamItem

C = 10


class _Method:
    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


class _ByFirstPixel(nn.Module):
    """A 'source model' whose prediction is read from the image: class = first pixel value."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), C).float() * 5


class _Referenced(CollapseMonitor):
    """The monitor as a run feeds it: each batch with the source reference's rows and logits, as the
    engine adds them (``model`` None: a run without a reference)."""

    def __init__(self, method: _Method, model: nn.Module | None, on_collapse: str, **kwargs: object) -> None:
        super().__init__(method, C, model is not None, on_collapse, **kwargs)  # type: ignore[arg-type]
        self.source = SourceReference(model, "all") if model is not None else None

    def on_batch(self, out: BatchOutputs) -> None:
        if self.source is not None:
            passed = self.source.outputs(out.batch.images, out.batch.first_index)
            out.source_rows, out.source_logits = passed["source_rows"], passed["source_logits"]
        super().on_batch(out)


def _outputs(classes: torch.Tensor, pred: torch.Tensor, entropy: float, start: int) -> BatchOutputs:
    n = len(classes)
    images = torch.zeros(n, 3, 2, 2)
    images[:, 0, 0, 0] = classes.float()
    items = [StreamItem(f"{start + i}.png", Path(f"{start + i}.png")) for i in range(n)]
    return BatchOutputs(Batch(items, images, start), pred, torch.ones(n), torch.full((n,), entropy),
                        torch.zeros(n, 5, dtype=torch.long), torch.zeros(n, dtype=torch.bool), (), False, 0.0)


def _feed(monitor: CollapseMonitor, collapsed: bool, batches: int = 12, batch: int = 32) -> None:
    """The batches through the monitor and the run's answer to what it finds, as ``tta adapt`` does."""
    g = torch.Generator().manual_seed(0)
    actions = CollapseActions(monitor, monitor.method)
    for b in range(batches):
        classes = torch.randint(0, C, (batch,), generator=g)
        pred = torch.zeros(batch, dtype=torch.long) if collapsed else classes.clone()
        entropy = 0.01 if collapsed else 0.8 * math.log(C)
        out = _outputs(classes, pred, entropy, b * batch)
        monitor.on_batch(out)
        actions.on_batch(out)


def test_effective_classes() -> None:
    assert effective_classes(torch.zeros(50, dtype=torch.long), C) == pytest.approx(1.0)
    assert effective_classes(torch.arange(C).repeat(5), C) == pytest.approx(C)


@pytest.mark.parametrize("reference", [True, False])
def test_one_class_stream_is_a_collapse_and_resets(reference: bool) -> None:
    method = _Method()
    monitor = _Referenced(method, _ByFirstPixel() if reference else None, "reset", window=64)
    _feed(monitor, collapsed=True)
    assert monitor.events and method.resets == len(monitor.events)
    assert monitor.take_event() is None  # each event is handed to the run once
    assert monitor.events[0].batch == 1  # the first full window (2 batches of 32)
    assert monitor.events[0].signals["effective_classes"] == pytest.approx(1.0)
    assert "collapse" in (monitor.progress_text() or "")
    health = monitor.health()
    # with a reference the flips of the source's confident predictions also read as harm
    assert health["verdict"] == ("hurt" if reference else "suspect")
    assert health["collapse_events"] == len(monitor.events) and "advice" in health


@pytest.mark.parametrize("reference", [True, False])
def test_healthy_stream_has_no_event(reference: bool) -> None:
    method = _Method()
    monitor = _Referenced(method, _ByFirstPixel() if reference else None, "reset", window=64)
    _feed(monitor, collapsed=False)
    assert not monitor.events and method.resets == 0
    health = monitor.health()
    assert health["verdict"] == ("no-change" if reference else "ok")


def test_label_shift_stream_is_not_a_collapse() -> None:
    """One class for a long stretch is a collapse only if the source does not see the same."""
    monitor = _Referenced(_Method(), _ByFirstPixel(), "reset", window=64)
    for b in range(8):
        classes = torch.full((32,), b // 4)
        monitor.on_batch(_outputs(classes, classes.clone(), 0.1, b * 32))
    assert not monitor.events


def test_collapse_onto_the_sources_own_favourite_class_is_flagged() -> None:
    """A weak source that gives 75% of the images one class: the collapse keeps agreeing with it
    on those 75%, so only the one-class share tells (SAR on a 10,000-image gaussian_noise stream,
    docs/METHODS.md)."""
    g = torch.Generator().manual_seed(0)
    monitor = _Referenced(_Method(), _ByFirstPixel(), "warn", window=64)
    for b in range(4):
        classes = torch.where(torch.rand(32, generator=g) < 0.75, 0, torch.randint(1, C, (32,), generator=g))
        pred = torch.zeros(32, dtype=torch.long)
        pred[0] = 3
        monitor.on_batch(_outputs(classes, pred, 0.1 * math.log(C), b * 32))
    assert monitor.events
    signals = monitor.events[0].signals
    assert signals["agreement"] > Thresholds().max_agreement  # the earlier rule alone missed it
    assert signals["source_entropy"] - signals["entropy"] < Thresholds().entropy_drop


def test_stop_raises_and_warn_only_records() -> None:
    with pytest.raises(CollapseStop) as stopped:
        _feed(_Referenced(_Method(), _ByFirstPixel(), "stop", window=64), collapsed=True)
    assert stopped.value.exit_code == 4
    method = _Method()
    monitor = _Referenced(method, _ByFirstPixel(), "warn", window=64)
    _feed(monitor, collapsed=True)
    assert monitor.events and method.resets == 0
    assert monitor.health()["verdict"] == "collapsed"


def test_health_says_how_much_changed() -> None:
    monitor = _Referenced(_Method(), _ByFirstPixel(), "warn", window=10_000)
    classes = torch.arange(C).repeat(4)
    pred = classes.clone()
    pred[:8] = (pred[:8] + 1) % C  # 8 of 40 differ, diversity intact
    monitor.on_batch(_outputs(classes, pred, 1.0, 0))
    health = monitor.health()
    assert health["changed_share"] == pytest.approx(0.2)
    # the source was sure of every prediction the adapted model changed: an estimated loss
    assert health["estimated_accuracy_change"]["points"] < 0 and health["verdict"] == "hurt"


def test_flips_of_the_sources_unsure_predictions_are_ok() -> None:
    class Unsure(_ByFirstPixel):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = super().forward(x)
            unsure = x[:, 0, 0, 1] > 0  # these images: the runner-up class is nearly as likely
            runner_up = torch.nn.functional.one_hot((x[:, 0, 0, 0].long() + 1) % C, C).float() * 4.9
            return logits + unsure[:, None] * runner_up

    monitor = _Referenced(_Method(), Unsure(), "warn", window=10_000)
    classes = torch.arange(C).repeat(4)
    out = _outputs(classes, classes.clone(), 1.0, 0)
    out.batch.images[:8, 0, 0, 1] = 1.0
    out.pred[:8] = (classes[:8] + 1) % C  # exactly the 8 unsure ones move to the runner-up
    monitor.on_batch(out)
    health = monitor.health()
    assert health["verdict"] == "ok" and health["estimated_accuracy_change"]["points"] > 0


def test_an_ok_on_a_model_beyond_the_validated_classes_comes_with_advice() -> None:
    classes = 100
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (256,), generator=g)
    source = torch.nn.functional.one_hot(labels, classes).float() * (0.6 + torch.rand(256, generator=g)[:, None] * 4)
    source[torch.arange(256), (labels + 1) % classes] = 0.5
    unsure = source.max(1).values < 1.4
    pred = torch.where(unsure, (labels + 1) % classes, labels)  # only the source's least sure move
    monitor = CollapseMonitor(_Method(), classes, True, "warn")  # type: ignore[arg-type]
    monitor.whole.add(pred, torch.ones(256))
    monitor.change.add(source, pred)  # type: ignore[union-attr]
    health = monitor.health()
    assert health["verdict"] == "ok" and health["advice"] == UNVALIDATED_ADVICE
    assert health["reasons"][-1] == MANY_CLASSES
    monitor.whole.non_finite += 1  # a prediction from non-finite logits: no longer ok, no weak-evidence line
    health = monitor.health()
    assert health["verdict"] == "suspect" and health["advice"] == HARM_ADVICE
    assert MANY_CLASSES not in health["reasons"]


def test_unknown_action_is_a_user_error() -> None:
    from tta_cli.errors import TTAError

    with pytest.raises(TTAError):
        CollapseMonitor(_Method(), C, None, "explode")  # type: ignore[arg-type]


def test_reference_ignores_the_methods_hooks() -> None:
    from tests.helpers import random_inputs, tiny_timm
    from tta_cli.methods import create_method

    model = tiny_timm("test_resnet")
    x = random_inputs(1)[0]
    with torch.no_grad():
        expected = model.eval()(x)
    create_method("norm", model, batch_size=8)  # BatchNorm hooks on the model
    assert torch.allclose(SourceReference(model, "all").logits(x), expected, atol=1e-5)
    assert health_verdict.__name__  # the module's public helpers import cleanly


def test_adapt_records_health_and_source_column(tmp_path: Path, tiny_model_dir: Path) -> None:
    make_images(tmp_path / "images", 10)
    out = tmp_path / "out"
    result = invoke("adapt", tmp_path / "images", "--model", f"local-dir:{tiny_model_dir}", "--method", "tent",
                    "-b", "4", "--out", out, "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    assert record["health"]["verdict"] in ("ok", "no-change", "suspect", "collapsed")
    assert record["collapse_events"] == []
    rows = csv_rows(out / "predictions.csv")
    assert all(r["source_pred"] != "" for r in rows)


def test_on_collapse_stop_exits_non_zero_with_status(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tta_cli.run

    def always_collapsing(method, num_classes, reference, on_collapse, batch_size):
        return CollapseMonitor(method, num_classes, reference, on_collapse, window=4,
                               thresholds=Thresholds(diversity_ratio=1e9, max_agreement=1.0))

    monkeypatch.setattr(tta_cli.run, "monitor_for", always_collapsing)
    make_images(tmp_path / "images", 12)
    out = tmp_path / "out"
    result = invoke("adapt", tmp_path / "images", "--model", f"local-dir:{tiny_model_dir}", "--method", "tent",
                    "-b", "4", "--out", out, "--workers", "0", "--quiet", "--on-collapse", "stop")
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, CollapseStop) and result.exception.exit_code == 4  # `tta` exits 4
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "collapsed"
    assert record["collapse_events"][0]["batch"] == 0 and record["health"]["verdict"] == "collapsed"


def test_non_finite_predictions_are_counted_apart_and_make_the_run_suspect() -> None:
    """Issue #24.10: a pred -1 (non-finite logits) crashed the monitor in bincount."""
    monitor = _Referenced(_Method(), _ByFirstPixel(), "warn", window=16)
    classes = torch.arange(C).repeat(2)
    pred = classes.clone()
    pred[:3] = -1
    outputs = _outputs(classes, pred, 1.0, 0)
    outputs.entropy[:3] = float("nan")
    monitor.on_batch(outputs)
    monitor.on_batch(_outputs(classes, torch.full_like(classes, -1), float("nan"), 20))  # none finite
    health = monitor.health()
    assert health["images"] == 17 and health["non_finite_predictions"] == 23
    assert health["verdict"] == "suspect" and math.isfinite(health["mean_entropy_nats"])
    json.dumps(health, allow_nan=False)


def test_the_monitor_state_survives_a_resume() -> None:
    """Issue #24.14: after --resume the health covered only the images after it."""
    whole = _Referenced(_Method(), _ByFirstPixel(), "warn", window=64)
    _feed(whole, collapsed=False, batches=6)
    first = _Referenced(_Method(), _ByFirstPixel(), "warn", window=64)
    _feed(first, collapsed=False, batches=3)
    resumed = _Referenced(_Method(), _ByFirstPixel(), "warn", window=64)
    resumed.load_resume_state(first.state_for_resume())
    g = torch.Generator().manual_seed(0)
    for b in range(6):  # the same batches as _feed, the last three of them
        classes = torch.randint(0, C, (32,), generator=g)
        if b >= 3:
            resumed.on_batch(_outputs(classes, classes.clone(), 0.8 * math.log(C), b * 32))
    assert resumed.health() == whole.health()
