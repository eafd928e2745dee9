"""The source reference: a frozen copy of the source model, run by the engine beside the method.

Everything that judges a run without labels (the collapse window, the change estimate, the harm
verdict: ``tta_cli.monitor``, ``tta_cli.trust``) compares the adapted predictions with the source
model's on the same images. The engine runs the copy right after each step, under the run's device,
precision and memory format, and its logits reach the sinks in ``BatchOutputs`` like any other
output.

Those signals are statistics over many images, so by default only a sample is referenced
(``sampled``): every image of the first ``REFERENCE_ALL_FIRST`` (short runs are judged on every
image) and then one whole batch in ``REFERENCE_EVERY``, chosen by stream index (the same batches
after ``--resume``). ``all`` references every image, for a complete ``source_pred`` column. How
the sample was chosen and what it costs: docs/TRUST.md, docs/PERFORMANCE.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, Protocol

import torch
from torch import nn

from tta_cli.collapse_window import frozen_copy

ReferenceMode = Literal["sampled", "all"]
"""What a reference predicts (``--source-reference off`` is no reference: ``tta_cli.choices``)."""
REFERENCE_ALL_FIRST = 512
"""``sampled``: the first images of the stream that are all referenced (a short run is judged on
every image; the sample saves time where it adds up, on long streams)."""
REFERENCE_EVERY = 4
"""``sampled``: after those, one batch in this many is referenced (whole: a forward of a full batch
costs less per image than one of a quarter of each batch, and the batch-level signals see whole
batches)."""


def referenced_rows(mode: str, first_index: int, n: int, batch_size: int,
                    device: torch.device | None = None) -> torch.Tensor:
    """The rows of a batch of ``n`` images starting at stream index ``first_index`` (in a run of
    ``batch_size``) that ``mode`` (sampled or all) references: all of them or none."""
    chosen = mode == "all" or first_index < REFERENCE_ALL_FIRST or (first_index // batch_size) % REFERENCE_EVERY == 0
    return torch.arange(n if chosen else 0, device=device)


class RunPrecision(Protocol):
    """What the reference takes from the method: the run's precision and memory format."""

    def autocast(self) -> contextlib.AbstractContextManager[Any]: ...

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor: ...


class SourceReference:
    """The frozen source copy (eval mode, source BatchNorm statistics) and which rows it predicts."""

    def __init__(self, model: nn.Module, mode: ReferenceMode = "sampled", batch_size: int = 64) -> None:
        if mode not in ("sampled", "all"):
            raise ValueError(f"a source reference is sampled or all, not {mode!r}")
        self.model = frozen_copy(model)  # before the method adds its BatchNorm hooks
        self.mode = mode
        self.batch_size = batch_size

    @property
    def complete(self) -> bool:
        """Every image is referenced (a full ``source_pred`` column)."""
        return self.mode == "all"

    def rows(self, first_index: int, n: int, device: torch.device | None = None) -> torch.Tensor:
        return referenced_rows(self.mode, first_index, n, self.batch_size, device)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, precision: RunPrecision | None = None) -> torch.Tensor:
        """The source model's logits (float32) for ``images``, under ``precision`` where given."""
        images = images.to(next(self.model.parameters()).device)
        if precision is None:
            return self.model(images).float()
        with precision.autocast():
            return self.model(precision.prepare_input(images)).float()

    def configure(self, channels_last: bool) -> None:
        """The run's memory format for the copy's weights too."""
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, first_index: int, precision: RunPrecision | None = None,
                computed: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The engine's pass: the referenced rows of a batch and their source logits; ``computed``:
        the source logits of every row, where the step made them (``StepResult.source_logits``),
        taken instead of a forward."""
        rows = self.rows(first_index, images.shape[0], images.device)
        if computed is not None:
            logits = computed.detach()[rows].float()
        else:
            logits = self.logits(images[rows], precision) if len(rows) else images.new_zeros((0, 0))
        return {"source_rows": rows, "source_logits": logits}


def source_reference_for(mode: str, changes_predictions: bool, model: nn.Module,
                         batch_size: int = 64) -> SourceReference | None:
    """The run's reference, made before the method wraps (and changes) ``model``; none when off or
    for a method whose predictions are the source's (``TTAMethod.changes_predictions``)."""
    if mode == "off" or not changes_predictions:
        return None
    return SourceReference(model, mode, batch_size)  # type: ignore[arg-type]
