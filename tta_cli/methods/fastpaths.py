"""Speed paths shared by the methods: same results as the plain passes, less work or no host sync.

Each helper says when it is exact. They fall in three groups:

* **No host sync** (a GPU never waits for its queue): ``masked_mean`` instead of indexing by a
  mask, ``step_if`` / ``update_if_any`` instead of ``if count:``, ``nan_aware_ema`` instead of a
  Python float, and ``DeviceLog`` to read the decisions later, many at once.
* **Skipped passes** where their result is known: ``backward_or_zero`` (the backward of an empty
  mean is zero gradients).
* **Fewer rows**: ``ReliableRows`` runs the gradient passes on the selected rows only, and predicts
  with a no-grad forward when few rows are selected, on batch-independent models.
* **Less memory**: ``micro_batched_backward`` runs a pass in micro-batches with the gradient of the
  whole batch's mean, on batch-independent models.

``tests/test_methods_fastpaths.py`` checks each against its plain counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tta_cli.methods.collectives import world

NO_GRAD_FIRST_BELOW = 0.5
"""Expected share of selected rows below which a batch-independent model predicts with a no-grad
forward and forwards only the selected rows again with autograd (an extra no-grad forward against
the full-batch backward: break-even near 0.6 on the CPU, docs/PERFORMANCE.md)."""

PENDING_LIMIT = 1024
"""Device-side values kept unread at most this many (then read at once: bounded memory)."""

ROW_PLANS = ("full", "reliable rows", "no-grad first", "nothing reliable")
"""How a batch's gradient passes ran, as counted by ``ReliableRows.plans``."""


def reads_are_free(tensor: torch.Tensor) -> bool:
    """Reading a value on the host costs nothing on the CPU; on a GPU it waits for the queue,
    so there the methods decide on the device instead (same results)."""
    return tensor.device.type == "cpu"


# --- no host sync ---------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``values[mask]``, count) without a data-dependent shape, so no host sync on a GPU.

    Exact: gradients equal those of ``values[mask].mean()`` bit for bit (each selected value gets
    1/count). The mean is 0 for an empty mask: its backward then gives the zero gradients that the
    authors' mean over an empty selection gives (a plain 0/0 would give NaN gradients); use
    ``nan_if_empty`` for the value the authors' mean reports.

    Data-parallel (``collectives``): the local sum over the global count, so that the
    gradients summed over the ranks are the global mean's; the count returned is this rank's.
    """
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / world().sum(count).clamp(min=1), count


def batch_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean over the batch's rows; data-parallel, the local sum over the global row count
    (its gradients summed over the ranks are the global batch mean's)."""
    collectives = world()
    if not collectives.active:
        return values.mean(0)
    return values.sum(0) / collectives.sum_int(values.shape[0])


def nan_if_empty(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The value the authors' mean reports: NaN for an empty selection."""
    return torch.where(count > 0, mean.detach(), torch.full_like(mean, math.nan))


def reported_mean(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The value of a ``masked_mean`` over ``count`` values as the authors' mean reports it (NaN
    for an empty selection); data-parallel, the global batch's (the same on every process)."""
    return nan_if_empty(world().sum(mean), world().sum(count))


@torch.no_grad()
def mean_of_kept_rows(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of the rows of ``values`` where ``keep`` holds, their count), without a host sync: a
    zero mean when none is kept; data-parallel, over the global batch."""
    count = world().sum(keep.sum())
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return world().sum(torch.where(keep.unsqueeze(1), values, zero).sum(0)) / count.clamp(min=1), count


class Updatable(Protocol):
    """What the update helpers need of a method (``TTAMethod`` has it)."""

    params: list[torch.nn.Parameter]

    def backward(self, loss: torch.Tensor) -> None: ...

    def optimizer_step(self) -> None: ...

    def optimizer_tensors(self) -> list[torch.Tensor]: ...

    def reads_are_free(self, tensor: torch.Tensor) -> bool: ...


@torch.no_grad()
def step_if(method: Updatable, apply: torch.Tensor | bool) -> None:
    """An optimiser step that takes effect only where ``apply`` holds.

    A bool (or a CPU tensor, free to read) decides on the host. A device tensor is never read: the
    step runs and the parameters and momentum are put back where ``apply`` is false. Exact: the
    result is bit for bit the stepped or the unstepped tensors, provided every tensor the step
    writes exists before it (SGD's momentum buffers are primed, ``snapshot.prime_momentum``).
    """
    if isinstance(apply, bool) or method.reads_are_free(apply):
        if bool(apply):
            method.optimizer_step()
        return
    state = method.optimizer_tensors()
    saved = [t.clone() for t in state]
    method.optimizer_step()
    for tensor, old in zip(state, saved, strict=True):
        tensor.copy_(torch.where(apply, tensor, old))


def step_if_any(method: Updatable, count: torch.Tensor) -> None:
    """An optimiser step only if ``count`` > 0 (``step_if``); data-parallel, the global count."""
    step_if(method, world().sum(count) > 0)


def update_if_any(method: Updatable, loss: torch.Tensor, count: torch.Tensor) -> None:
    """Backward and optimiser step only if ``count`` > 0 (EATA's rule), without a sync on a GPU.

    Where the count is free to read, an empty selection skips both; on a device the backward
    runs (zero gradients, from ``masked_mean``) and the step is undone (``step_if``). Exact.
    Data-parallel, the decision is the global count's, so every rank takes it.
    """
    count = world().sum(count)
    if method.reads_are_free(count):
        if int(count):
            method.backward(loss)
            method.optimizer_step()
        return
    method.backward(loss)
    step_if(method, count > 0)


def backward_or_zero(method: Updatable, loss: torch.Tensor, count: torch.Tensor) -> None:
    """The backward of ``loss``, a ``masked_mean`` over ``count`` values.

    Where the count is free to read and zero, the gradients are set to zero instead of running
    the backward, which is what that backward gives: exact. Data-parallel, on the global count.
    """
    count = world().sum(count)
    if method.reads_are_free(count) and int(count) == 0:
        for param in method.params:
            param.grad = torch.zeros_like(param)
        return
    method.backward(loss)


@torch.no_grad()
def nan_aware_ema(ema: torch.Tensor | None, value: torch.Tensor, momentum: float) -> torch.Tensor:
    """The authors' ``ema = value if ema is None else m * ema + (1 - m) * value``, skipped for a NaN
    value, on the device: NaN stands for None, so no step reads it back.

    Exact: computed in float64 like the authors' Python float (float32 on MPS, which has no
    float64), and ``torch.where`` picks one of its inputs.
    """
    dtype = torch.float32 if value.device.type == "mps" else torch.float64
    value = value.detach().to(dtype)
    ema = ema if ema is not None else torch.full_like(value, math.nan)
    blended = momentum * ema + (1 - momentum) * value
    return torch.where(value.isnan(), ema, torch.where(ema.isnan(), value, blended))


class DeviceLog:
    """Values decided on the device (0-dim tensors) or the host, kept by batch index and read in
    one transfer when asked (or every ``PENDING_LIMIT`` values, to bound memory)."""

    def __init__(self, limit: int = PENDING_LIMIT) -> None:
        self.limit = limit
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._read: list[tuple[int, Any]] = []

    def add(self, key: int, value: torch.Tensor | float | bool) -> None:
        if not isinstance(value, torch.Tensor):
            self._read.append((key, value))
            return
        self._pending.append((key, value.detach()))
        if len(self._pending) >= self.limit:
            self.settle()

    def settle(self) -> None:
        """Read the pending device values (one transfer for all of them)."""
        if not self._pending:
            return
        values = torch.stack([v for _, v in self._pending]).cpu().tolist()
        self._read += [(k, v) for (k, _), v in zip(self._pending, values, strict=True)]
        self._read.sort(key=lambda entry: entry[0])
        self._pending.clear()

    def entries(self) -> list[tuple[int, Any]]:
        """(batch index, value) pairs in batch order."""
        self.settle()
        return self._read


# --- fewer rows -----------------------------------------------------------------------------------


@dataclass
class GradientRows:
    """The rows of a batch that a method's gradient passes forward.

    ``x`` is the whole batch (``index`` None) or the selected rows only; ``selected`` is the
    filter's mask over the rows of ``x`` (all true when only selected rows are kept); ``count``
    is the number selected when it is known on the host (None: on the device only), over the
    global batch when data-parallel.
    """

    x: torch.Tensor
    selected: torch.Tensor
    index: torch.Tensor | None
    count: int | None
    recompute: bool
    """The first forward had no autograd: values that need gradients are forwarded again."""
    plan: str
    batch_size: int

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row values over the batch, restricted to these rows."""
        return values if self.index is None else values.index_select(0, self.index)

    def with_grad(self, values: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``values`` (from the first forward, over the batch) on these rows, with autograd:
        taken from the first forward, or ``forward(self.x)`` when that had no autograd."""
        return forward(self.x) if self.recompute else self.take(values)

    def to_batch(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask over these rows as a mask over the batch (false for the rows left out)."""
        if self.index is None:
            return mask
        full = torch.zeros(self.batch_size, dtype=torch.bool, device=mask.device)
        return full.index_put_((self.index,), mask)


class FullBatch:
    """The authors' gradient passes: on the whole batch, always. ``ReliableRows`` is the speed path
    with the same interface; a method chooses one of them once (``gradient_rows``)."""

    enabled = False
    """The passes may run on the selected rows only."""

    def __init__(self) -> None:
        self.plans = dict.fromkeys(ROW_PLANS, 0)

    def first_forward(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward(x)``: the predictions, with autograd."""
        return forward(x)

    def rows(self, x: torch.Tensor, selected: torch.Tensor, host: bool) -> GradientRows:
        """The rows the gradient passes of this batch use (call after ``first_forward``): all of them.

        ``host``: reading the selected count is free (``TTAMethod.reads_are_free``)."""
        count = world().sum_int(int(selected.sum())) if host else None
        return GradientRows(x, selected, None, count, False, "full", x.shape[0])

    def count(self, plan: str) -> None:
        self.plans[plan] += 1


class ReliableRows(FullBatch):
    """Runs the gradient passes on the selected rows only, where that is exact.

    Exact on a batch-independent model (no BatchNorm on batch statistics: ``selection.
    is_batch_independent``), the only models it is chosen for: there a row's output does not depend
    on the others, and a row outside the selection gets no gradient, so leaving it out changes no
    gradient and no selected value (up to float summation order within a row's ops, which the tests
    bound at 1e-6).

    When the expected selected share is below ``NO_GRAD_FIRST_BELOW``, the first forward (the
    predictions) runs without autograd and the selected rows are forwarded again with it.
    ``after_grad_forward`` says whether the rows are worth cutting when the first forward had
    autograd anyway (SAR: yes, its second forward gets smaller; ETA: no, it has none).
    """

    enabled = True

    def __init__(self, after_grad_forward: bool = True) -> None:
        super().__init__()
        self.after_grad_forward = after_grad_forward
        self.share: float | None = None
        """Running (EMA) share of selected rows; chooses the plan of the next batch."""
        self._no_grad_first = False

    def first_forward(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` for the predictions, with autograd unless the plan is "no-grad first"."""
        self._no_grad_first = self.share is not None and self.share < NO_GRAD_FIRST_BELOW
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._no_grad_first):
            return forward(x)

    def rows(self, x: torch.Tensor, selected: torch.Tensor, host: bool) -> GradientRows:
        batch = x.shape[0]
        if self._no_grad_first or self.after_grad_forward:
            index = selected.nonzero().squeeze(1)  # a host sync: the shape depends on the data
            k = index.numel()
            k_all = world().sum_int(k)  # data-parallel: plans and counts are the global batch's
            self._track(k_all, world().sum_int(batch))
            rows = x if k == batch else x.index_select(0, index)
            keep_all = torch.ones(k, dtype=torch.bool, device=selected.device)
            plan = "no-grad first" if self._no_grad_first else "reliable rows"
            return GradientRows(rows, keep_all, index, k_all, self._no_grad_first, plan, batch)
        # the running share needs the count on the host: a sync, but only on batch-independent
        # models, where the no-grad-first plan it chooses saves far more
        count = world().sum_int(int(selected.sum()))
        self._track(count, world().sum_int(batch))
        return GradientRows(x, selected, None, count, False, "full", batch)

    def _track(self, selected: int, batch: int) -> None:
        share = selected / batch
        self.share = share if self.share is None else 0.8 * self.share + 0.2 * share


def gradient_rows(rows_only: bool, after_grad_forward: bool = True) -> FullBatch:
    """The gradient passes a method runs: on the selected rows (``ReliableRows``, exact on
    batch-independent models only) or the authors' full batch (``FullBatch``)."""
    return ReliableRows(after_grad_forward) if rows_only else FullBatch()


__all__ = [
    "NO_GRAD_FIRST_BELOW",
    "PENDING_LIMIT",
    "ROW_PLANS",
    "DeviceLog",
    "FullBatch",
    "GradientRows",
    "ReliableRows",
    "backward_or_zero",
    "batch_mean",
    "gradient_rows",
    "masked_mean",
    "mean_of_kept_rows",
    "nan_aware_ema",
    "nan_if_empty",
    "reads_are_free",
    "reported_mean",
    "step_if",
    "step_if_any",
    "update_if_any",
]


RowLosses = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""A chunk of inputs -> (its logits, its per-row losses with zeros where a row is not selected)."""


def micro_batched_backward(row_losses: RowLosses, x: torch.Tensor, rows: int,
                           params: list[torch.Tensor], count: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of the mean selected loss of ``x``, ``rows`` inputs at a time: memory for the
    activations of ``rows`` inputs instead of the batch.

    Exact (to the last bits of the sums) on batch-independent models only: LayerNorm, GroupNorm,
    BatchNorm on fixed statistics; with batch statistics a chunk is normalised by its own. Each
    chunk's backward accumulates the gradient of its summed losses; the sum of the chunks is the
    gradient of the batch's sum, and dividing by the number of selected rows (``count``; every row
    when not given) gives the mean's gradient.
    Returns the logits (detached) and the mean loss. ``params`` must hold no gradient before.
    """
    logits, total = [], x.new_zeros(())
    for chunk in x.split(rows):
        chunk_logits, losses = row_losses(chunk)
        chunk_sum = losses.sum()
        if chunk_sum.requires_grad:
            chunk_sum.backward()
        logits.append(chunk_logits.detach())
        total = total + chunk_sum.detach()
    n = torch.as_tensor(x.shape[0] if count is None else count, device=x.device, dtype=total.dtype)
    n = n.clamp(min=1)
    for p in params:
        if p.grad is not None:
            p.grad.div_(n)
    return torch.cat(logits), total / n
