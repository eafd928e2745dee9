"""The exported ``model/`` of a run, made to behave as the run did, and the check that it does.

Where BatchNorm normalised with test-batch statistics (``bn_stats`` ``batch`` or ``mix``), the
source running statistics in the weights would make the exported model, in eval mode, a different
model from the one that predicted. With ``--export-bn stream`` (the default) the BN hooks keep an
EMA of the batch statistics over the stream and the export writes it as the running statistics
(mixed with the source's as the run mixed them, for ``mix``). The EMA's momentum is
``batch_size / STREAM_WINDOW`` per forward (at most 1; a plain mean over the first forwards), so
that it weighs about the last ``STREAM_WINDOW`` images: the late stream, whose model is the one
exported. It averages per-batch variances, as the run normalised each batch with its own; the
between-batch spread of the means is deliberately left out. ``--export-bn source`` keeps the
source statistics.

``LastInputs`` keeps the last images' inputs and predictions (about ``STREAM_WINDOW`` images, a
few batches, on the CPU); :func:`agreement` re-predicts them with the exported folder, loaded as a
user would (``timm.create_model("local-dir:...", pretrained=True).eval()``), and counts how often it
agrees with ``predictions.csv``.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Protocol

import torch

from tta_cli.atomic import atomic_write
from tta_cli.models import LoadedModel, export_model
from tta_cli.outputs import BatchOutputs

STREAM_WINDOW = 256
"""Images the exported stream statistics and the agreement check are about (the late stream)."""


def stream_momentum(batch_size: int, window: int = STREAM_WINDOW) -> float:
    return min(1.0, batch_size / window)


class ExportedMethod(Protocol):
    """What the export needs of a method (``tta_cli.methods``: the sinks do not import it)."""

    bn_mode: str | None

    def track_stream_bn_statistics(self, momentum: float) -> bool: ...

    def adapted_state_dict(self) -> dict[str, torch.Tensor]: ...

    def stream_bn_statistics(self) -> dict[str, torch.Tensor]: ...

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]: ...


def track_stream_statistics(method: ExportedMethod, batch_size: int) -> bool:
    """Start the EMA of the stream's BatchNorm statistics over about the last ``STREAM_WINDOW``
    images; False where BN did not use test-batch statistics (nothing to track)."""
    return method.track_stream_bn_statistics(stream_momentum(batch_size))


def exported_state(method: ExportedMethod, export_bn: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict to export and which BN statistics it holds (source, stream or run: the
    running statistics the run itself kept, e.g. ``ema``)."""
    state = method.adapted_state_dict()
    if export_bn == "stream":
        stream = method.stream_bn_statistics()
        if stream:
            state.update({k: v.detach().clone() for k, v in stream.items()})
            return state, "stream"
    return state, "run" if method.bn_mode == "ema" else "source"


class LastInputs:
    """A sink keeping the last ``window`` images' input tensors and predicted classes (whole batches)."""

    def __init__(self, window: int = STREAM_WINDOW) -> None:
        self.window = window
        self._batches: deque[tuple[torch.Tensor, torch.Tensor]] = deque()
        self._count = 0

    def on_batch(self, out: BatchOutputs) -> None:
        n = len(out.batch.items)
        if not n:
            return
        self._batches.append((out.batch.images[:n].detach().cpu(), out.pred[:n].clone()))
        self._count += n
        while self._count - len(self._batches[0][1]) >= self.window:
            self._count -= len(self._batches.popleft()[1])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._batches:
            return None
        images = torch.cat([b[0] for b in self._batches])[-self.window:]
        preds = torch.cat([b[1] for b in self._batches])[-self.window:]
        return images, preds


@torch.no_grad()
def agreement(model_dir: Path, last: LastInputs, device: torch.device, batch_size: int = 64) -> dict[str, Any]:
    """How often the exported folder, in eval mode, predicts what the run predicted on the last images."""
    import timm

    kept = last.tensors()
    if kept is None:
        return {"images": 0, "agree": 0, "share": None}
    images, preds = kept
    model = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval().to(device)
    predicted = torch.cat([model(images[i:i + batch_size].to(device)).argmax(1).cpu()
                           for i in range(0, len(images), batch_size)])
    agree = int((predicted == preds).sum())
    return {"images": len(preds), "agree": agree, "share": agree / len(preds)}


def export_run_model(loaded: LoadedModel, method: ExportedMethod, export_bn: str, out: Path, last: LastInputs,
                     device: torch.device) -> dict[str, Any]:
    """Write ``model/`` (and a method's further exports); how it agrees with the late predictions."""
    state, bn_statistics = exported_state(method, export_bn)
    problem = None
    if not _all_finite(state):
        problem = "the exported model holds non-finite values"
        if bn_statistics == "stream":  # the stream's statistics took in non-finite activations
            state, bn_statistics = exported_state(method, "source")
            problem = ("the stream's BatchNorm statistics were not finite: the model keeps the source's"
                       if _all_finite(state) else problem)
    export_model(loaded, state, out / "model")
    _write_extra_exports(method, out)
    record = {"bn_statistics": bn_statistics, "agreement": agreement(out / "model", last, device)}
    return record | ({"non_finite": problem} if problem else {})


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _write_extra_exports(method: ExportedMethod, out: Path) -> None:
    """Further state dicts a method exports (e.g. a teacher-student method's student)."""
    from safetensors.torch import save_file

    for filename, state in method.extra_exports().items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(out / filename, lambda path, tensors=tensors: save_file(tensors, str(path)))


def add_to_record(record: dict[str, Any], model_export: dict[str, Any] | None) -> None:
    """The export's record; a non-finite export makes an ``ok`` run ``suspect``."""
    if model_export is None:
        return
    record["model_export"] = model_export
    if "non_finite" in model_export:
        record["health"]["reasons"].append(model_export["non_finite"])
        if record["health"]["verdict"] in ("ok", "no-change"):
            record["health"]["verdict"] = "suspect"
