"""What every method shares: configuring the model, the parameters it adapts, step, reset, export.

A method wraps a model. ``method(x)`` returns the logits of the first forward of ``x`` (the
predictions, made before this batch's update) and adapts on ``x``; ``method.step(x)`` returns the
same logits plus which samples were used. Subclasses implement ``forward_and_adapt`` (the loss and
the update) and, if they adapt other layers than every norm layer, ``collect_params``.

The pieces live in small modules of their own: ``precision`` (autocast, memory format, compile),
``snapshot`` (the source state for reset), ``fastpaths`` (speed paths with the same results),
``selection`` (norm layers, BatchNorm statistics), ``hyperparameters`` (checking configs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta_cli.methods import precision as _precision
from tta_cli.methods import resume as _resume
from tta_cli.methods.collectives import world
from tta_cli.methods.fastpaths import (
    NO_GRAD_FIRST_BELOW,
    PENDING_LIMIT,
    DeviceLog,
    masked_mean,
    nan_if_empty,
    reads_are_free,
    step_if,
)
from tta_cli.methods.hyperparameters import at_least, between, check_config, greater_than
from tta_cli.methods.precision import PRECISIONS, Performance
from tta_cli.methods.selection import BatchNormStats, affine_parameters, has_batchnorm, resolve_bn_stats
from tta_cli.methods.snapshot import LastGood, SourceSnapshot, bn_buffers, momentum_buffers, prime_momentum

BNStatsChoice = Literal["auto", "batch", "source", "mix", "ema"]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of the logits, as the authors compute it."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """E0 = 0.4 ln C, the reliable-sample threshold of EATA and SAR."""
    return factor * math.log(num_classes)


@dataclass
class StepResult:
    """One batch through a method.

    ``logits`` are the first forward's (the predictions); ``used`` marks the samples that
    contributed to the update after every filter; ``filtered`` counts the samples left after each
    filter, in order (e.g. reliable, then non-redundant); ``reset`` says the model was restored.
    """

    logits: torch.Tensor
    used: torch.Tensor
    filtered: tuple[torch.Tensor | int, ...] = ()
    reset: bool | torch.Tensor = False
    """A 0-dim bool tensor when the method decided on the device (read it when convenient)."""
    source_logits: torch.Tensor | None = None
    """The source model's logits of every row, where the step made them anyway (auto): the run's
    source reference takes them instead of a forward of its own (``tta_cli.reference``)."""


@dataclass
class MethodConfig:
    """Hyperparameters every method has; each method subclasses it (one dataclass per method)."""

    bn_stats: BNStatsChoice = "auto"
    """BatchNorm statistics: auto|batch|source|mix|ema (auto: batch, or mix at batch size 1)."""
    bn_alpha: float = field(default=0.1, metadata=between(0.0, 1.0))
    """Weight of the test batch in the mix (alpha-BN) and ema statistics."""


@dataclass
class EntropyConfig(MethodConfig):
    """Hyperparameters of the gradient-based methods."""

    lr: float | None = field(default=None, metadata=greater_than(0.0))
    """SGD learning rate; None applies the SAR paper's rule from the model and batch size."""
    momentum: float = field(default=0.9, metadata=between(0.0, 1.0, high_inclusive=False))
    steps: int = field(default=1, metadata=at_least(1))
    """Adaptation steps per batch (predictions are always the first forward's)."""
    episodic: bool = False
    """Reset to the source model before every batch."""


def is_vit_like(model: nn.Module) -> bool:
    """Transformers (patch embedding + blocks) follow the LayerNorm learning-rate rule."""
    return hasattr(model, "patch_embed")


def default_lr(model: nn.Module, batch_size: int, double_at_bs1: bool = False) -> float:
    """The SAR paper's learning-rate rule (docs/METHODS.md, "Shared behaviour"), for SGD with momentum 0.9."""
    if is_vit_like(model):
        lr = 0.001 / 64 * batch_size
    else:
        lr = 0.00025 / 64 * batch_size * 2 if batch_size < 32 else 0.00025
    if double_at_bs1 and batch_size == 1:
        lr *= 2
    return lr


class TTAMethod(nn.Module):
    """Base class of all methods. Subclasses set ``name``, ``config_class`` and the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    updates_parameters: ClassVar[bool] = True
    double_lr_at_bs1: ClassVar[bool] = False
    amp_aware: ClassVar[bool] = False
    """The method runs its forwards through ``run_model`` (autocast there, losses in fp32);
    otherwise ``step`` puts the whole batch under autocast (fine for methods with no backward)."""
    predicts_first_forward: ClassVar[bool] = True
    """The predictions are the model's first forward of the batch (False: a teacher's, an
    augmentation average or adjusted outputs; the method's docstring says which)."""
    changes_predictions: ClassVar[bool] = True
    """False for the source model itself: its predictions are the source's by definition (the
    run then needs no frozen source copy to compare with)."""
    data_parallel: ClassVar[bool] = False
    """Every quantity over the batch goes through ``collectives``, so the method runs data-parallel
    under torchrun with one process's results; the others refuse more than one process."""
    not_data_parallel: ClassVar[str] = ""
    """Where ``data_parallel`` is False: one line saying why, and what to use instead (shown when
    the run refuses more than one process)."""
    clean_data: ClassVar[str] = ""
    """What ``prepare`` learns from clean source-domain images before the stream (EATA: "the
    Fisher regulariser"); empty for methods that take none."""
    without_clean_data: ClassVar[str] = ""
    """The method that runs instead when a method with ``clean_data`` is given no clean images."""

    def __init__(self, model: nn.Module, config: MethodConfig | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.config = config if config is not None else self.config_class()
        check_config(self.config)
        self.batch_size = batch_size
        self.bn_mode = resolve_bn_stats(self.config.bn_stats, batch_size) if has_batchnorm(model) else None
        given_lr = getattr(self.config, "lr", None)
        self.lr = given_lr if given_lr is not None else default_lr(model, batch_size, self.double_lr_at_bs1)
        self.lr_source = "given" if given_lr is not None else "paper rule"
        self.configure_model()
        named = self.collect_params() if self.updates_parameters else []
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = self.build_optimizer() if self.params else None
        prime_momentum(self.optimizer)
        self.generator = torch.Generator().manual_seed(0)
        self.batches_seen = 0
        self._reset_flags = DeviceLog()
        self.performance = Performance()
        self.scaler: torch.amp.GradScaler | None = None
        self.source = SourceSnapshot(self.params, self._written_buffers(), self.optimizer)
        self._last_good = LastGood()
        self._non_finite = DeviceLog()
        self._initial_tensors: dict[str, Any] | None = None

    # --- hooks for subclasses ---------------------------------------------------------------------

    def configure_model(self) -> None:
        """Eval mode (no dropout or drop-path: docs/METHODS.md, "Shared behaviour") with BatchNorm
        on the chosen statistics."""
        self.model.eval()
        self._bn_hooks = BatchNormStats(self.model, self.bn_mode) if self.bn_mode else None
        if self._bn_hooks is not None:
            self._bn_hooks.alpha = self.config.bn_alpha

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs to adapt; by default every norm affine parameter."""
        return affine_parameters(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        # fused on CUDA: one kernel per step, and loss scaling without a host sync; on the CPU the
        # single-tensor loop, which is the authors' arithmetic (and as fast for a few norm layers)
        fused = all(p.is_cuda for p in self.params)
        return torch.optim.SGD(self.params, lr=self.lr, momentum=getattr(self.config, "momentum", 0.9),
                               fused=fused or None)

    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        raise NotImplementedError

    # --- before the stream: clean source-domain data (``clean_data``) -----------------------------

    def prepare(self, clean_batches: Iterable[torch.Tensor]) -> int:
        """Learn what the method needs from clean source-domain batches (on a copy of the source
        model: the model that adapts never sees them); returns the number of images used."""
        return 0

    def preparation(self) -> dict[str, Any]:
        """What ``prepare`` learnt, to hand to other runs on the same source model."""
        return {}

    def use_preparation(self, prepared: dict[str, Any]) -> None:
        """Take what ``prepare`` learnt on another instance (the tensors are copied)."""

    # --- how it runs (precision.py) ---------------------------------------------------------------

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        """Choose how the method runs (never what it computes); call once, before the stream."""
        _precision.check_precision(precision)
        self.performance = Performance(precision, channels_last, compile)
        self.scaler = _precision.loss_scaler(precision, self.device, bool(self.params))
        _precision.apply_to_model(self.model, self.performance)

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return _precision.autocast(self.device, self.performance.precision)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return _precision.prepare_input(x, self.performance.channels_last)

    @contextlib.contextmanager
    def source_statistics(self) -> Iterator[None]:
        """Meanwhile every BatchNorm normalises with the source statistics and nothing is tracked: a
        forward of the source model without a copy of it."""
        hooks = self._bn_hooks
        if hooks is not None:
            hooks.paused = True
        try:
            yield
        finally:
            if hooks is not None:
                hooks.paused = False

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits in fp32, under the run's precision and memory format."""
        with self.autocast():
            logits = self.model(self.prepare_input(x))
        return logits.float()

    def reads_are_free(self, tensor: torch.Tensor) -> bool:
        """Whether reading ``tensor`` on the host costs nothing (``fastpaths.reads_are_free``);
        the fast paths ask the method, so a test can declare reads expensive, as on a GPU."""
        return reads_are_free(tensor)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the loss; data-parallel, the gradients are then summed over the ranks."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        world().sum_grads(self.params)

    def optimizer_step(self) -> None:
        if self.scaler is None or not _precision.has_scaled(self.scaler):
            # no loss was scaled yet (e.g. SAR's first batches had no reliable sample and the zero
            # gradients were set directly): the gradients are unscaled, a plain step is exact
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def optimizer_step_if(self, apply: torch.Tensor | bool) -> None:
        """An optimiser step that takes effect only where ``apply`` holds (``fastpaths.step_if``)."""
        step_if(self, apply)

    def optimizer_tensors(self) -> list[torch.Tensor]:
        """Everything an optimiser step writes: the parameters and their momentum."""
        return [*self.params, *self.momentum_buffers()]

    def momentum_buffers(self) -> list[torch.Tensor]:
        return momentum_buffers(self.optimizer, self.params)

    # --- the public loop API ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x).logits

    def predictions_from(self, logits: torch.Tensor) -> torch.Tensor:
        """The method's predictions (logits) of a global batch whose model outputs are ``logits``:
        the outputs themselves, except for a method that adjusts them (ROID's prior correction)."""
        return logits

    def step(self, x: torch.Tensor) -> StepResult:
        """Predict on ``x`` with the current model, then adapt ``config.steps`` times."""
        x = self.prepare_input(x)
        if getattr(self.config, "episodic", False):
            self.reset()
        good = self._last_good.refresh(self.guarded_tensors())
        with contextlib.nullcontext() if self.amp_aware else self.autocast():
            result = self.forward_and_adapt(x)
            for _ in range(getattr(self.config, "steps", 1) - 1):
                later = self.forward_and_adapt(x)
                result.reset = _either(result.reset, later.reset)
        result.logits = result.logits.float()
        self._guard_finite(result.logits, good)
        self.batches_seen += 1
        return result

    # --- the non-finite guard (snapshot.LastGood) -------------------------------------------------

    def guarded_tensors(self) -> list[torch.Tensor]:
        """What an update writes and the guard restores: the optimiser's tensors and written buffers."""
        return [*self.optimizer_tensors(), *self._written_buffers().values()]

    def _guard_finite(self, logits: torch.Tensor, good: LastGood) -> None:
        """Undo this batch's update where its logits or the updated tensors are not finite."""
        tensors = self.guarded_tensors()
        ok = good.keep_or_restore(logits, tensors)
        self._non_finite.add(self.batches_seen, ~ok if isinstance(ok, torch.Tensor) else not ok)

    @property
    def non_finite_updates(self) -> int:
        """Batches whose update was skipped (and undone) for non-finite logits or values."""
        return sum(int(bool(hit)) for _, hit in self._non_finite.entries())

    # --- reset (snapshot.py) ----------------------------------------------------------------------

    def reset(self) -> None:
        """Restore the source parameters (and BN statistics, optimiser state) bit for bit."""
        self.source.restore(self.params, self._written_buffers(), self.optimizer)

    def reset_where(self, flag: torch.Tensor, momentum: bool = True) -> None:
        """``reset()`` where the 0-dim bool ``flag`` holds, decided on the device (no host sync);
        ``momentum=False`` keeps the SGD momentum."""
        buffers = self.momentum_buffers() if momentum else []
        self.source.restore_where(flag, self.params, self._written_buffers(), buffers)

    @property
    def resets(self) -> list[int]:
        """Batch indices (0-based) where the model was restored to the source."""
        return [index for index, hit in self._reset_flags.entries() if hit]

    def record_reset(self, flag: bool | torch.Tensor = True) -> None:
        """Note a reset of the current batch; a device flag is read later, with others at once."""
        self._reset_flags.add(self.batches_seen, flag)

    def settle(self) -> None:
        """Read the values decided on the device so far (one transfer for all of them)."""
        self._reset_flags.settle()
        self._non_finite.settle()

    # --- resume (tta_cli.checkpoint; the format in ``resume``) ----------------------------------

    resume_attributes: ClassVar[tuple[str, ...]] = ()
    """Further attributes that are run state (EMAs, counters, memory banks), saved for ``--resume``;
    values are tensors, numbers, strings, None, or lists/dicts/dataclasses of them."""

    model_is_fixed: bool = False
    """The run never changes the model's parameters and buffers: checkpoints leave them out."""

    def state_for_resume(self) -> dict[str, Any]:
        """Everything the next batch depends on (``resume.method_state``)."""
        self.settle()
        return _resume.method_state(self)

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """The inverse of ``state_for_resume``, on a freshly built method of the same run."""
        _resume.load_method_state(self, state)

    def mark_initial_tensors(self) -> None:
        """Note the parameters as built: checkpoints then keep only those that change (``resume``)."""
        self._initial_tensors = _resume.mark_initial_tensors(self)

    # --- export and records -----------------------------------------------------------------------

    def reseed(self, seed: int) -> None:
        """Start the method's own random draws from ``seed`` (one dedicated CPU generator, nothing
        else draws from it: docs/METHODS.md, "Randomness"); the run calls it just before the first batch."""
        self.generator = torch.Generator().manual_seed(seed)

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """Files written next to ``model/`` besides the model (e.g. a teacher method's student)."""
        return {}

    def track_stream_bn_statistics(self, momentum: float) -> bool:
        """Start an EMA (``momentum`` per batch) of the stream's BatchNorm statistics for the export;
        False where BatchNorm did not use test-batch statistics (the source's are what the run used)."""
        if self._bn_hooks is None or self.bn_mode not in ("batch", "mix"):
            return False
        self._bn_hooks.track_stream(self.model, momentum)
        return True

    def stream_bn_statistics(self) -> dict[str, torch.Tensor]:
        """Running BatchNorm statistics with which the exported model, in eval mode, normalises as
        the run did (``--export-bn stream``); empty where the source statistics are those."""
        if self._bn_hooks is None or self.bn_mode not in ("batch", "mix"):
            return {}
        return self._bn_hooks.stream_running_stats(self.model)

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as it stands: the source's but for the adapted tensors.

        The source BN running statistics are in the buffers (the hooks never write them, except
        the ``ema`` statistics, which are the adaptation and are exported as such). Tensors are
        contiguous whatever the memory format used while adapting.
        """
        return {k: v.detach().clone(memory_format=torch.contiguous_format)
                for k, v in self.model.state_dict().items()}

    def stats(self) -> dict[str, Any]:
        """Method-specific state for progress and the run record (e.g. SAR's entropy EMA)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What was chosen for this run, for printing and for ``run.json``."""
        return {
            "method": self.name,
            "config": dict(vars(self.config)),
            "lr": self.lr if self.params else None,
            "lr_source": self.lr_source if self.params else None,
            "bn_stats": self.bn_mode,
            "adapted_parameters": len(self.param_names),
            "adapted_values": sum(p.numel() for p in self.params),
            "adapted_names": self.param_names,
            "performance": asdict(self.performance),
        }

    def close(self) -> None:
        """Remove the BN hooks: the model behaves as a plain timm model again."""
        if self._bn_hooks is not None:
            self._bn_hooks.remove()
            self._bn_hooks = None

    # --- helpers ----------------------------------------------------------------------------------

    def _written_buffers(self) -> dict[str, torch.Tensor]:
        """The BN buffers adapting writes (only the ``ema`` statistics), so the ones reset restores."""
        return bn_buffers(self.model) if self.bn_mode == "ema" else {}


def _either(a: bool | torch.Tensor, b: bool | torch.Tensor) -> bool | torch.Tensor:
    """Logical or of two reset flags, without reading a device flag."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))
    return a or b


__all__ = ["NO_GRAD_FIRST_BELOW", "PENDING_LIMIT", "PRECISIONS", "BNStatsChoice", "EntropyConfig", "MethodConfig",
           "Performance", "StepResult", "TTAMethod", "default_lr", "entropy_margin", "is_vit_like", "masked_mean",
           "nan_if_empty", "softmax_entropy"]
