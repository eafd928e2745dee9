"""``tta_cli.sinks.model_export``: the stream BatchNorm statistics in the export, the last inputs
kept for the agreement check, and the check itself."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import CLASSES, random_inputs, save_timm_folder, tiny_timm
from tta_cli.methods import create_method
from tta_cli.outputs import BatchOutputs
from tta_cli.sinks.model_export import LastInputs, agreement, exported_state, stream_momentum, track_stream_statistics
from tta_cli.sources.items import Batch, StreamItem


def outputs(images: torch.Tensor, pred: torch.Tensor, first: int) -> BatchOutputs:
    items = [StreamItem(f"{first + i}.png", Path(f"{first + i}.png")) for i in range(len(pred))]
    n = len(pred)
    return BatchOutputs(Batch(items, images, first), pred, torch.ones(n), torch.zeros(n),
                        torch.zeros(n, 5, dtype=torch.long), torch.zeros(n, dtype=torch.bool), (), False, 0.0)


def test_last_inputs_keep_the_last_window_of_images() -> None:
    last = LastInputs(window=10)
    for b in range(5):
        last.on_batch(outputs(torch.full((4, 1), float(b)), torch.arange(4) + 4 * b, 4 * b))
    kept = last.tensors()
    assert kept is not None
    images, preds = kept
    assert preds.tolist() == list(range(10, 20)) and images[0, 0] == 2.0


def test_momentum_weighs_the_last_window() -> None:
    assert stream_momentum(64) == 0.25 and stream_momentum(1) == 1 / 256 and stream_momentum(1024) == 1.0


def test_stream_export_of_a_norm_run_reproduces_its_predictions(tmp_path: Path) -> None:
    model = tiny_timm("test_resnet")
    method = create_method("norm", model, batch_size=16)
    assert track_stream_statistics(method, 16)
    x = random_inputs(n_batches=1, batch=16)[0] + 1
    pred = method.step(x).logits.argmax(1)
    state, which = exported_state(method, "stream")
    assert which == "stream"
    source_state, which = exported_state(method, "source")
    assert which == "source"
    assert not torch.equal(state["bn1.running_mean"], source_state["bn1.running_mean"])
    method.close()
    last = LastInputs()
    last.on_batch(outputs(x, pred, 0))
    model.load_state_dict(state)
    check = agreement(save_timm_folder(model, tmp_path / "model", CLASSES), last, torch.device("cpu"))
    assert check == {"images": 16, "agree": 16, "share": 1.0}  # one batch: exactly its statistics


def test_nothing_to_track_for_the_source_method() -> None:
    method = create_method("source", tiny_timm("test_resnet"), batch_size=8)
    assert not track_stream_statistics(method, 8)
    assert exported_state(method, "stream")[1] == "source"


def test_auto_exports_the_stream_statistics_it_predicted_with() -> None:
    model = tiny_timm("test_resnet")
    method = create_method("auto", model, batch_size=8, bn_choice_temperature=0.0, bn_stream="balanced")
    for x in random_inputs(3):
        method.step(x * 2 + 3.0)
    assert method.stream_model is not None
    running = {k: v for k, v in method.stream_model.state_dict().items() if k.endswith("running_mean")}
    state, label = exported_state(method, "stream")
    stats = method.stats()
    if stats["stream_statistics_share"] + stats["batch_statistics_share"] >= 0.5:
        assert label == "stream" and all(torch.equal(state[k], v) for k, v in running.items())
    else:
        assert label == "source"
    state, label = exported_state(method, "source")
    assert label == "source"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k.endswith("running_mean"))
    choice = method.bn_choice
    choice.weights_sum, choice.batches = torch.tensor([0.0, 0.0, 1.0]), 1
    assert exported_state(method, "stream")[1] == "stream"
    choice.weights_sum = torch.tensor([0.4, 0.6, 0.0])  # mostly the batch statistics
    assert exported_state(method, "stream")[1] == "stream"
    choice.weights_sum = torch.tensor([1.0, 0.0, 0.0])
    assert exported_state(method, "stream")[1] == "source"


def test_a_stream_shorter_than_the_window_exports_its_plain_mean_not_an_ema_from_the_source() -> None:
    """96 images at B = 32 (momentum 32/256): the exported statistics are the three batches'
    mean, as the run used them, not an EMA that still holds two thirds of the source's."""
    model = tiny_timm("test_resnet")
    source_mean = model.bn1.running_mean.clone()
    method = create_method("norm", model, batch_size=32)
    assert track_stream_statistics(method, 32)
    means: list[torch.Tensor] = []
    hook = method.model.bn1.register_forward_pre_hook(lambda _, args: means.append(args[0].mean((0, 2, 3))))
    for k, x in enumerate(random_inputs(n_batches=3, batch=32)):
        method.step(x + k)
    hook.remove()
    state, which = exported_state(method, "stream")
    method.close()
    assert which == "stream"
    torch.testing.assert_close(state["bn1.running_mean"], torch.stack(means).mean(0), rtol=1e-5, atol=1e-5)
    ema = source_mean.clone()
    for mean in means:
        ema.lerp_(mean, stream_momentum(32))
    assert not torch.allclose(state["bn1.running_mean"], ema, atol=1e-3)
