"""What every method shares: configuring the model, the parameters it adapts, reset and export.

A method wraps a model. ``method(x)`` returns the logits of the first forward of ``x`` (the
predictions, made before this batch's update) and adapts on ``x``; ``method.step(x)`` returns the
same logits plus which samples were used. Subclasses implement ``forward_and_adapt`` (the loss and
the update) and ``collect_params`` (which norm layers); everything else lives here.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tta_cli.methods.selection import (
    BatchNormStats,
    affine_parameters,
    has_batchnorm,
    resolve_bn_stats,
)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of the softmax of the logits, as the authors compute it."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of ``values[mask]``, count) without a data-dependent shape, so no host sync on a GPU.

    The mean is 0 for an empty mask: its backward then gives the zero gradients that the authors'
    mean over an empty selection gives (a plain 0/0 would give NaN gradients). Gradients equal
    those of ``values[mask].mean()`` bit for bit (each selected value gets 1/count).
    """
    count = mask.sum()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / count.clamp(min=1), count


def nan_if_empty(mean: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The value the authors' mean reports: NaN for an empty selection."""
    return torch.where(count > 0, mean.detach(), torch.full_like(mean, math.nan))


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


@dataclass
class MethodConfig:
    """Hyperparameters every method has; each method subclasses it (one dataclass per method)."""

    bn_stats: str = "auto"
    """BatchNorm statistics: auto|batch|source|mix|ema (auto: batch, or mix at batch size 1)."""
    bn_alpha: float = 0.1
    """Weight of the test batch in the mix (alpha-BN) and ema statistics."""


@dataclass
class EntropyConfig(MethodConfig):
    """Hyperparameters of the gradient-based methods."""

    lr: float | None = None
    """SGD learning rate; None applies the SAR paper's rule from the model and batch size."""
    momentum: float = 0.9
    steps: int = 1
    """Adaptation steps per batch (predictions are always the first forward's)."""
    episodic: bool = False
    """Reset to the source model before every batch."""


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

NO_GRAD_FIRST_BELOW = 0.5
"""Expected share of rows that need gradients below which a batch-independent model predicts with a
no-grad forward and forwards only those rows again with autograd (an extra no-grad forward against
the full-batch backward: break-even near 0.6 on the CPU, docs/PERFORMANCE.md)."""

PENDING_LIMIT = 1024
"""Device-side flags kept unread at most this many batches (then read at once: bounded memory)."""


@dataclass
class Performance:
    """How a method runs, not what it computes: chosen per run and recorded by ``describe``."""

    precision: str = "fp32"
    """fp32, or autocast to bf16 / fp16 (fp16 with dynamic loss scaling); losses stay in fp32."""
    channels_last: bool = False
    """Model and inputs in channels-last memory format (faster convolutions)."""
    compile: bool | str = False
    """torch.compile the model in place (a string names the backend)."""


def is_vit_like(model: nn.Module) -> bool:
    """Transformers (patch embedding + blocks) follow the LayerNorm learning-rate rule."""
    return hasattr(model, "patch_embed")


def default_lr(model: nn.Module, batch_size: int, double_at_bs1: bool = False) -> float:
    """The SAR paper's learning-rate rule (spec section 0), for SGD with momentum 0.9."""
    if is_vit_like(model):
        lr = 0.001 / 64 * batch_size
    else:
        lr = 0.00025 / 64 * batch_size * 2 if batch_size < 32 else 0.00025
    if double_at_bs1 and batch_size == 1:
        lr *= 2
    return lr


class TTAMethod(nn.Module):
    """Base class of all methods. Subclasses set ``name``, ``config_class`` and the two hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    updates_parameters: ClassVar[bool] = True
    double_lr_at_bs1: ClassVar[bool] = False
    amp_aware: ClassVar[bool] = False
    """The method runs its forwards through ``run_model`` (autocast there, losses in fp32);
    otherwise ``step`` puts the whole batch under autocast (fine for methods with no backward)."""

    def __init__(self, model: nn.Module, config: MethodConfig | None = None, batch_size: int = 64) -> None:
        super().__init__()
        self.model = model
        self.config = config if config is not None else self.config_class()
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
        self._prime_momentum()
        self.batches_seen = 0
        self._reset_log: list[int] = []
        self._pending_resets: list[tuple[int, torch.Tensor]] = []
        self.performance = Performance()
        self.scaler: torch.amp.GradScaler | None = None
        # The reset snapshot is the adapted tensors and the optimiser state only, never a copy of
        # the whole model: everything else is frozen, so restoring these restores the source.
        self._source_params = [p.detach().clone() for p in self.params]
        self._source_buffers = self._bn_buffers_copy() if self.bn_mode == "ema" else {}
        self._source_optim = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None

    # --- hooks for subclasses ---------------------------------------------------------------------

    def configure_model(self) -> None:
        """Eval mode (no dropout / drop-path, trap 4) with BatchNorm on the chosen statistics."""
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

    # --- performance ------------------------------------------------------------------------------

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        """Choose how the method runs (never what it computes); call once, before the stream."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.performance = Performance(precision, channels_last, compile)
        device = self.device
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" and self.params else None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)  # parameters stay the same objects
        if compile:
            # in place, so parameter names, hooks and the state dict are unchanged
            self.model.compile(**({"backend": compile} if isinstance(compile, str) else {}))

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = PRECISIONS[self.performance.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.performance.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def run_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits in fp32, under the run's precision and memory format."""
        with self.autocast():
            logits = self.model(self.prepare_input(x))
        return logits.float()

    def reads_are_free(self, tensor: torch.Tensor) -> bool:
        """Reading a value on the host costs nothing on the CPU; on a GPU it waits for the queue,
        so there the methods decide on the device instead (same results, see the tests)."""
        return tensor.device.type == "cpu"

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
            return
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    @torch.no_grad()
    def optimizer_step_if(self, apply: torch.Tensor | bool) -> None:
        """An optimiser step that takes effect only where ``apply`` holds.

        A bool (or a CPU tensor, free to read) decides on the host. A device tensor is never read:
        the step runs and the parameters and momentum are put back where ``apply`` is false (the
        momentum buffers exist from the start, ``_prime_momentum``), so the loop never waits.
        """
        if isinstance(apply, bool) or self.reads_are_free(apply):
            if bool(apply):
                self.optimizer_step()
            return
        state = self._optimizer_tensors()
        saved = [t.clone() for t in state]
        self.optimizer_step()
        for tensor, old in zip(state, saved, strict=True):
            tensor.copy_(torch.where(apply, tensor, old))

    # --- the public loop API ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x).logits

    def step(self, x: torch.Tensor) -> StepResult:
        """Predict on ``x`` with the current model, then adapt ``config.steps`` times."""
        x = self.prepare_input(x)
        if getattr(self.config, "episodic", False):
            self.reset()
        with contextlib.nullcontext() if self.amp_aware else self.autocast():
            result = self.forward_and_adapt(x)
            for _ in range(getattr(self.config, "steps", 1) - 1):
                later = self.forward_and_adapt(x)
                result.reset = _either(result.reset, later.reset)
        result.logits = result.logits.float()
        self.batches_seen += 1
        return result

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the source parameters (and BN statistics, optimiser state) bit for bit."""
        for param, source in zip(self.params, self._source_params, strict=True):
            param.copy_(source)
        for name, buffer in self._bn_buffers().items():
            if name in self._source_buffers:
                buffer.copy_(self._source_buffers[name])
        if self.optimizer is not None and self._source_optim is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self._source_optim))

    @torch.no_grad()
    def reset_where(self, flag: torch.Tensor, momentum: bool = True) -> None:
        """``reset()`` where the 0-dim bool ``flag`` holds, decided on the device (no host sync).

        ``torch.where`` picks one of its inputs, so the result is bit for bit either the current
        tensors or the source ones. The source momentum is zero (``_prime_momentum``).
        """
        for param, source in zip(self.params, self._source_params, strict=True):
            param.copy_(torch.where(flag, source, param))
        for name, buffer in self._bn_buffers().items():
            if name in self._source_buffers:
                buffer.copy_(torch.where(flag, self._source_buffers[name], buffer))
        if momentum:
            for buffer in self._momentum_buffers():
                buffer.masked_fill_(flag, 0.0)

    @property
    def resets(self) -> list[int]:
        """Batch indices (0-based) where the model was restored to the source."""
        self.settle()
        return self._reset_log

    def record_reset(self, flag: bool | torch.Tensor = True) -> None:
        """Note a reset of the current batch; a device flag is read later, with others at once."""
        if isinstance(flag, torch.Tensor):
            self._pending_resets.append((self.batches_seen, flag.detach()))
            if len(self._pending_resets) >= PENDING_LIMIT:
                self.settle()
        elif flag:
            self._reset_log.append(self.batches_seen)

    def settle(self) -> None:
        """Read the flags decided on the device so far (one transfer for all of them)."""
        if not self._pending_resets:
            return
        flags = torch.stack([f for _, f in self._pending_resets]).cpu().tolist()
        self._reset_log += [i for (i, _), hit in zip(self._pending_resets, flags, strict=True) if hit]
        self._pending_resets.clear()

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
            "config": {k: v for k, v in vars(self.config).items()},
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

    def _prime_momentum(self) -> None:
        """Create SGD's momentum buffers as zeros before the first step.

        With dampening 0 the first step then computes 0.9 * 0 + g = g, exactly torch's lazily
        created buffer, and every step can be undone on the device (``optimizer_step_if``).
        """
        if self.optimizer is None:
            return
        for group in self.optimizer.param_groups:
            if group.get("momentum", 0):
                for param in group["params"]:
                    self.optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)

    def _momentum_buffers(self) -> list[torch.Tensor]:
        if self.optimizer is None:
            return []
        states = (self.optimizer.state.get(p, {}) for p in self.params)
        return [s["momentum_buffer"] for s in states if s.get("momentum_buffer") is not None]

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        """Everything an optimiser step writes: the parameters and their momentum."""
        return [*self.params, *self._momentum_buffers()]

    def _bn_buffers(self) -> dict[str, torch.Tensor]:
        return {
            n: b for n, b in self.model.named_buffers() if n.endswith(("running_mean", "running_var"))
        }

    def _bn_buffers_copy(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self._bn_buffers().items()}


def _either(a: bool | torch.Tensor, b: bool | torch.Tensor) -> bool | torch.Tensor:
    """Logical or of two reset flags, without reading a device flag."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))
    return a or b


def entropy_margin(num_classes: int, factor: float = 0.4) -> float:
    """E0 = 0.4 ln C, the reliable-sample threshold of EATA and SAR."""
    return factor * math.log(num_classes)


__all__ = [
    "NO_GRAD_FIRST_BELOW",
    "PRECISIONS",
    "EntropyConfig",
    "MethodConfig",
    "Performance",
    "StepResult",
    "TTAMethod",
    "default_lr",
    "entropy_margin",
    "masked_mean",
    "nan_if_empty",
    "softmax_entropy",
]
