"""auto: chooses a method and its settings from what it can see without labels, and guards it.

Not a paper's method: a policy over the project's faithful methods, chosen by measurement on the
wild benchmark (``docs/METHODS.md``, "auto"; ``docs/BENCHMARKS.md``, "auto v5" and the sections
before it). What it looks at, before the first batch and while the stream runs:

* the model's normalisation layers (``selection.has_batchnorm``, ``norm_modules``):
  - **BatchNorm**: nothing is learned. Each batch is predicted with three sets of statistics:
    the source's, the batch's own (``norm``) and the stream's so far, class-balanced
    (``ClassBalancedStats``: running moments per predicted class, averaged over all the classes,
    the source's standing in for classes not seen yet; ``bn_stream``, ``bn_stream_labels``). The prediction
    with the lowest mean entropy over the latest 64 or more images is kept
    (``bn_stats=choose``); near ties, within about ``bn_choice_temperature`` ln C, mix the
    predictions' probabilities. No statistics are blended with the source's per layer and batch
    (that breaks EfficientNet-Lite0); the batch's own take a new corruption at once; the stream's
    keep what batches of few classes (label shift, correlated labels, small batches) lack, and
    being balanced over the classes they do not become the statistics of the classes seen last
    (a plain running mean, ``bn_stream=running``, does, and on clean class-ordered streams
    predicts confidently and wrongly: docs/BENCHMARKS.md, "auto v4"). At batch size 1 the batch
    statistics are no candidate.
    ``bn_stats=ema`` (running statistics from the source's, moved with a momentum set by the
    batch's prediction variety, ``BatchVariety``) and ``bn_stats=mix`` (alpha-BN per batch) are
    earlier rules, ``bn_depth`` < 1 moves only the shallow layers' statistics (docs/METHODS.md);
  - **GroupNorm / LayerNorm / none** (batch-independent models): ``inner`` (see
    ``AutoConfig.inner``) with its own defaults, under the guard below;
* the number of classes C (the thresholds are in units of ln C) and the batch size B;
* the stream: a frozen source copy predicts every batch; over a window the ``tta_cli.monitor``
  signals (diversity against the source's, agreement, entropy drop in units of ln C) flag a
  collapse; the inner method is reset, and after ``max_collapses`` events auto stops adapting and
  predicts with the source model for the rest of the stream ("never worse than the source").

``describe()["choice"]`` records what was chosen and why; ``tta adapt`` prints it.
"""

from __future__ import annotations

import collections
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.methods._registry import create_method, register_method
from tta_cli.methods.base import MethodConfig, StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import BatchNormStats, batchnorm_layers, has_batchnorm, norm_modules

InnerChoice = Literal["auto", "source", "tent", "eta", "sar", "deyo", "roid", "lame"]


@dataclass
class AutoConfig(MethodConfig):
    inner: InnerChoice = "auto"
    """The method for batch-independent (GroupNorm / LayerNorm / no-norm) models; auto: measured."""
    bn_stats: Literal["choose", "ema", "mix"] = "choose"
    """BatchNorm models: choose (per batch, the source statistics, the batch's own or the stream's
    (``bn_stream``), whichever predicts with the lowest mean entropy), ema (running statistics that
    start at the source's and move towards each batch's with a momentum set by the batch's variety)
    or mix (alpha-BN: source and batch statistics mixed per batch, nothing carried over)."""
    bn_choice_temperature: float = field(default=0.005, metadata=at_least(0.0))
    """BatchNorm models with ``bn_stats=choose``: 0 keeps the lowest-entropy prediction; t > 0 mixes
    the candidates' probabilities with weights softmax(-H / (t ln C)) (H: their mean entropies), so
    a near tie, where the choice is a coin toss, takes them all."""
    bn_stream: Literal["balanced", "running", "off"] = "balanced"
    """BatchNorm models with ``bn_stats=choose``: a third candidate, the prediction with statistics
    of the stream so far. balanced: class-balanced running statistics (``ClassBalancedStats``; the
    source's stand in for classes not seen yet); running: one running mean over the stream's
    batches, from the first batch's (confidently wrong on clean class-ordered streams,
    docs/BENCHMARKS.md, "auto v4"); off: only the source and the batch statistics."""
    bn_stream_labels: Literal["choice", "source"] = "choice"
    """``bn_stream=balanced``: the class each image counts for. choice: the argmax of the source and
    batch statistics' predictions mixed as v3.1 mixes them (each batch alone; better labels on a
    shifted stream, the source's on a batch of few classes); source: the source model's."""
    bn_stream_prior: float = field(default=32.0, metadata=at_least(0.0))
    """``bn_stream=balanced``: each class's moments count as its images so far against this many
    images' worth of the source statistics, so classes seen on few images stay near the source's
    (0: a class's first images count fully; measured in docs/BENCHMARKS.md, "auto v5")."""
    bn_stream_momentum: float = field(default=0.1, metadata=between(0.0, 1.0, low_inclusive=False))
    """The stream statistics' momentum per 64 images (``STREAM_MOMENTUM_IMAGES``)."""
    bn_choice_window: int = field(default=0, metadata=at_least(0))
    """BatchNorm models with ``bn_stats=choose``: the mean entropies compared are over the last
    batches that hold at least this many images, so that batches of a few images are not judged on
    their own few entropies; 0: 64 with a stream candidate, 1 (each batch alone) without."""
    bn_alpha_max: float = field(default=0.25, metadata=between(0.0, 1.0))
    """BatchNorm models: the batch's weight (ema: the momentum; mix: in alpha-BN) for a batch as
    varied as the stream."""
    bn_depth: float = field(default=1.0, metadata=between(0.0, 1.0))
    """BatchNorm models: the share of BatchNorm layers, from the input, whose statistics move; the
    deeper ones keep the source's."""
    guard: bool = True
    """Watch for collapse against a frozen source copy (one extra no-grad forward per batch)."""
    variety_floor: float = field(default=0.0, metadata=between(0.0, 1.0, high_inclusive=False))
    """BatchNorm models: batches less varied than this (``BatchVariety``) get weight 0."""
    max_collapses: int = field(default=2, metadata=at_least(1))
    """After this many collapse events, stop adapting and predict with the source model."""
    window: int = field(default=0, metadata=at_least(0))
    """Images in the guard's window; 0: max(256, 2 B, 8 C)."""


STREAM_MOMENTUM_IMAGES = 64
"""``bn_stream_momentum`` is the weight of a batch of this many images (1 - (1 - m)^(B / 64) for B)."""

DEFAULT_INNER = "eta"
"""Batch-independent models: measured in docs/BENCHMARKS.md ("auto"); see ``choose``."""


def model_norm_kind(model: nn.Module) -> str:
    """batchnorm, groupnorm, layernorm or none: what the model normalises with."""
    if has_batchnorm(model):
        return "batchnorm"
    kinds = {type(m).__name__.lower() for _, m in norm_modules(model)}
    if any("group" in k for k in kinds):
        return "groupnorm"
    return "layernorm" if kinds else "none"


BN_RULES = {
    "choose": "per batch, the source statistics or the batch's own, whichever predicts with the lower entropy "
              "(near ties mix them)",
    "choose+balanced": "per batch, the source statistics, the batch's own or the stream's so far (class-balanced), "
                       "whichever predicts with the lowest entropy over the latest 64 or more images (near ties mix "
                       "them)",
    "choose+running": "per batch, the source statistics, the batch's own or a running mean of the stream's, "
                      "whichever predicts with the lowest entropy (near ties mix them)",
    "ema": "running statistics from the source's, momentum per batch from its prediction variety",
    "mix": "per batch, source and batch statistics mixed by the batch's prediction variety (alpha-BN)",
}


def choose(kind: str, batch_size: int, num_classes: int, inner: str, bn_stats: str = "choose",
           bn_stream: str = "balanced") -> dict[str, Any]:
    """The plan for a model: which method, which settings, and why (recorded as ``choice``)."""
    if kind == "batchnorm":
        rule = f"{bn_stats}+{bn_stream}" if bn_stats == "choose" and bn_stream != "off" else bn_stats
        return {"method": "norm", "norm": kind, "bn_stats": BN_RULES[rule],
                "why": "BatchNorm: test-time statistics gain most on shifted data, but one batch's statistics "
                       "fail on batches of one or few classes (label shift, correlated streams); the rule is the "
                       "one measured safest in docs/BENCHMARKS.md"}
    name = DEFAULT_INNER if inner == "auto" else inner
    return {"method": name, "norm": kind,
            "why": f"{kind}: batch-independent model; {name} measured safest among entropy methods "
                   f"(thresholds in units of ln C={math.log(num_classes):.2f}), guarded against collapse"}


def effective_classes(counts: torch.Tensor) -> float:
    """exp of the entropy of a class histogram: 1 for one class, C for uniform."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class BatchVariety:
    """How varied a batch looks against the stream: its effective number of source-predicted
    classes over what a batch of the same size drawn from the stream's own (source-predicted)
    class distribution would have. Near 1 for a shuffled stream, whatever the source's bias (a
    corruption that makes the source predict few classes lowers both); near 1 / n for batches of
    one class out of n (label shift, correlated streams). The stream histogram starts from
    ``prior`` images spread uniformly over the classes, so the first batches of a class-ordered
    stream are not taken for the whole distribution."""

    def __init__(self, num_classes: int, prior: int, draws: int = 16) -> None:
        self.counts = torch.full((num_classes,), prior / num_classes, dtype=torch.float64)
        self.draws = draws
        self.generator = torch.Generator().manual_seed(0)

    def ratio(self, source_pred: torch.Tensor) -> float:
        batch = torch.bincount(source_pred, minlength=len(self.counts)).double()
        self.counts += batch
        n = source_pred.numel()
        if n <= 1:
            return 0.0
        samples = torch.multinomial(self.counts.float(), n * self.draws, replacement=True,
                                    generator=self.generator).view(self.draws, n)
        expected = sum(effective_classes(torch.bincount(s, minlength=len(self.counts))) for s in samples)
        expected /= self.draws
        if expected <= 1.0:
            return 1.0
        return min(max((effective_classes(batch) - 1) / (expected - 1), 0.0), 1.0)


class ClassBalancedStats:
    """Class-balanced running BatchNorm statistics of a stream, on a model copy's buffers.

    Each BatchNorm input's per-image channel moments (mean and mean square) are kept per class
    (the class each image is predicted to be, ``labels``) as running means: a class with n images
    in the batch moves with weight 1 - (1 - m)^(n C / 64), so a shuffled stream moves every class at
    about ``momentum`` per 64 images; a class's first images set its moments. The statistics used
    are the average over all C classes of each class's moments weighted n / (n + ``prior``) against
    the source statistics (n: the class's images so far), so a class not seen yet counts with the
    source statistics. A run of one class (a class-ordered stream) thus moves them by about 1 / C,
    where a plain running mean would become that class's statistics; a shifted stream that shows
    all its classes moves them all the way."""

    def __init__(self, model: nn.Module, num_classes: int, momentum: float, prior: float = 0.0) -> None:
        self.num_classes, self.momentum, self.prior = num_classes, momentum, prior
        self.labels: torch.Tensor | None = None
        layers = batchnorm_layers(model)
        self._source = {id(layer): (layer.running_mean.clone(), layer.running_var.clone()) for layer in layers}
        self._moments: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles = [layer.register_forward_pre_hook(self._pre_hook) for layer in layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def _pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.labels is None:
            return
        x = args[0].float()
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        # (B, channels); a sum and a norm are vectorised reductions, ten times faster than var_mean here
        means = flat.mean(2)
        squares = torch.linalg.vector_norm(flat, 2, dim=2) ** 2 / flat.shape[2]
        onehot = torch.nn.functional.one_hot(self.labels, self.num_classes).to(x)  # (B, C)
        counts = onehot.sum(0)
        present = counts > 0
        batch_means = (onehot.T @ means) / counts.clamp_min(1)[:, None]
        batch_squares = (onehot.T @ squares) / counts.clamp_min(1)[:, None]
        key = id(module)
        if key not in self._moments:
            self._moments[key] = (torch.zeros_like(batch_means), torch.zeros_like(batch_squares),
                                  torch.zeros_like(counts))
        class_means, class_squares, images = self._moments[key]
        weight = 1.0 - (1.0 - self.momentum) ** (counts * self.num_classes / STREAM_MOMENTUM_IMAGES)
        weight = torch.where(images > 0, weight, present.to(weight))[:, None]
        class_means.lerp_(batch_means, weight)
        class_squares.lerp_(batch_squares, weight)
        images += counts
        mean, var = self._balanced(key)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    def _balanced(self, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The class-balanced mean and variance of one layer: each class's moments count as its
        images against ``prior`` images of the source statistics (a class not seen yet is the
        source's)."""
        class_means, class_squares, images = self._moments[key]
        trust = (images / (images + self.prior).clamp_min(torch.finfo(images.dtype).tiny))[:, None]
        source_mean, source_var = self._source[key]
        source_share = self.num_classes - trust.sum()
        mean = ((class_means * trust).sum(0) + source_share * source_mean) / self.num_classes
        square = ((class_squares * trust).sum(0) + source_share * (source_var + source_mean**2)) / self.num_classes
        return mean, (square - mean**2).clamp_min(0)


class EntropyWindow:
    """Mean entropy of each candidate prediction over the latest batches that together hold at
    least ``images`` images."""

    def __init__(self, images: int) -> None:
        self.images = images
        self.batches: collections.deque[tuple[int, torch.Tensor]] = collections.deque()
        self.count = 0

    def add(self, entropy_sums: torch.Tensor, count: int) -> torch.Tensor:
        """``entropy_sums``: each candidate's entropy summed over this batch's ``count`` images."""
        self.batches.append((count, entropy_sums))
        self.count += count
        while self.count - self.batches[0][0] >= self.images:
            self.count -= self.batches.popleft()[0]
        return sum(sums for _, sums in self.batches) / self.count  # type: ignore[return-value]


def batch_alpha(ratio: float, alpha_max: float, floor: float) -> float:
    """alpha-BN weight: ``alpha_max`` for a batch as varied as the stream, 0 below ``floor``,
    linear in between."""
    return alpha_max * min(max((ratio - floor) / (1 - floor), 0.0), 1.0)


class _Guard:
    """The collapse signals of ``tta_cli.monitor`` over a window, on the device's outputs."""

    def __init__(self, num_classes: int, window: int) -> None:
        from tta_cli.monitor import Thresholds

        self.num_classes, self.window, self.thresholds = num_classes, window, Thresholds()
        self.parts: list[tuple[torch.Tensor, ...]] = []
        self.count = 0

    def add(self, logits: torch.Tensor, source_logits: torch.Tensor) -> dict[str, float] | None:
        """The window's signals when they show a collapse (the window then starts afresh), else None."""
        from tta_cli.monitor import is_collapsed, window_signals

        part = (logits.argmax(1).cpu(), softmax_entropy(logits).cpu(),
                source_logits.argmax(1).cpu(), softmax_entropy(source_logits).cpu())
        self.parts.append(part)
        self.count += len(part[0])
        while self.parts and self.count - len(self.parts[0][0]) >= self.window:
            self.count -= len(self.parts.pop(0)[0])
        if self.count < self.window:
            return None
        columns = [torch.cat(c) for c in zip(*self.parts, strict=True)]
        signals = window_signals(*columns, self.num_classes)
        if not is_collapsed(signals, self.thresholds):
            return None
        self.parts, self.count = [], 0
        return signals


@register_method
class Auto(TTAMethod):
    name = "auto"
    config_class = AutoConfig
    predicts_first_forward = False
    """BatchNorm models: the prediction with the source or the batch statistics (``choose``); others:
    the inner method's, after repeated collapse the source's."""
    config: AutoConfig

    def __init__(self, model: nn.Module, config: AutoConfig | None = None, batch_size: int = 64) -> None:
        nn.Module.__init__(self)
        self.config = config if config is not None else AutoConfig()
        self.model = model
        self.batch_size = batch_size
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.kind = model_norm_kind(model)
        self.choice = choose(self.kind, batch_size, max(self.num_classes, 2), self.config.inner,
                             self.config.bn_stats, self.config.bn_stream)
        self.reference = self._reference(model) if self.config.guard and self.kind != "batchnorm" else None
        self.stream_model: nn.Module | None = None
        self._stream_stats: BatchNormStats | ClassBalancedStats | None = None
        if self.kind == "batchnorm" and self.config.bn_stats == "choose" and self.config.bn_stream != "off":
            self.stream_model = self._reference(model)
            if self.config.bn_stream == "balanced":
                self._stream_stats = ClassBalancedStats(
                    self.stream_model, max(self.num_classes, 2), self.config.bn_stream_momentum,
                    self.config.bn_stream_prior)
            else:
                self._stream_stats = BatchNormStats(self.stream_model, "ema", alpha=1.0)  # the first batch's
        if self.kind == "batchnorm":
            inner_stats = "batch" if self.config.bn_stats == "choose" else self.config.bn_stats
            self.inner = create_method("norm", model, batch_size=batch_size, bn_stats=inner_stats, bn_alpha=0.0)
            if self.config.bn_depth < 1.0:
                self._move_shallow_statistics_only(model)
        else:
            self.inner = create_method(self.choice["method"], model, batch_size=batch_size)
        self.updates_parameters = self.inner.updates_parameters  # type: ignore[misc]
        self.collapse_events: list[dict[str, Any]] = []
        self.frozen_at: int | None = None
        self.alphas: list[float] = []
        self._choice_weights_sum: torch.Tensor | None = None
        self._choice_batches = 0
        self.batches_seen = 0
        self._guard: _Guard | None = None
        self._variety: BatchVariety | None = None
        self._entropy_window: EntropyWindow | None = None

    def _move_shallow_statistics_only(self, model: nn.Module) -> None:
        layers = batchnorm_layers(model)
        shallow = layers[: math.ceil(self.config.bn_depth * len(layers))]
        self.inner._bn_hooks.remove()  # type: ignore[union-attr]
        self.inner._bn_hooks = BatchNormStats(model, self.inner.bn_mode, 0.0, shallow)  # type: ignore[arg-type]

    @staticmethod
    def _reference(model: nn.Module) -> nn.Module:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        for module in reference.modules():
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        return reference

    # --- delegated state --------------------------------------------------------------------------

    @property
    def params(self) -> list[torch.Tensor]:  # type: ignore[override]
        return self.inner.params

    @property
    def param_names(self) -> list[str]:  # type: ignore[override]
        return self.inner.param_names

    @property
    def bn_mode(self) -> str | None:  # type: ignore[override]
        return self.inner.bn_mode

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:  # type: ignore[override]
        return self.inner.optimizer

    @property
    def resets(self) -> list[int]:
        return self.inner.resets

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        self.inner.configure_performance(precision, channels_last, compile)
        self.performance = self.inner.performance
        for copy_ in (self.reference, self.stream_model):
            if copy_ is not None and channels_last:
                copy_.to(memory_format=torch.channels_last)

    @property
    def non_finite_updates(self) -> int:
        return self.inner.non_finite_updates

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)

    def state_for_resume(self) -> dict[str, Any]:
        """The inner method's state; auto's own windows (guard, batch variety, the stream's running
        BatchNorm statistics) start afresh on a resume, so a resumed auto run can differ from an
        uninterrupted one after the resume point."""
        return self.inner.state_for_resume()

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.inner.load_resume_state(state)

    def reset(self) -> None:
        self.inner.reset()

    def settle(self) -> None:
        self.inner.settle()

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.adapted_state_dict()

    def stream_bn_statistics(self) -> dict[str, torch.Tensor]:
        """The stream candidate's statistics for the export when the run predicted mostly with test
        statistics, so the exported model predicts closer to the run; else none (the source's).
        Class-balanced: once the batch and stream statistics together carried most of the weight (a
        batch's own statistics cannot be exported, the stream's stand for them); running: once the
        stream's alone did."""
        shares = self.choice_shares()
        test_share = shares.get("stream_statistics_share", 0.0)
        if isinstance(self._stream_stats, ClassBalancedStats):
            test_share += shares.get("batch_statistics_share", 0.0)
        if self.stream_model is None or test_share < 0.5:
            return {}
        return {name: tensor.detach() for name, tensor in self.stream_model.state_dict().items()
                if name.endswith(("running_mean", "running_var"))}

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.inner.extra_exports()

    def close(self) -> None:
        self.inner.close()
        if self._stream_stats is not None:
            self._stream_stats.remove()

    # --- the stream -------------------------------------------------------------------------------

    def step(self, x: torch.Tensor) -> StepResult:
        if self.kind != "batchnorm":
            result = self._step_guarded(x)
        elif self.config.bn_stats == "choose":
            result = self._step_bn_choose(x)
        else:
            result = self._step_bn_variety(x)
        self.batches_seen += 1
        return result

    @torch.no_grad()
    def _step_bn_variety(self, x: torch.Tensor) -> StepResult:
        hooks: BatchNormStats = self.inner._bn_hooks  # type: ignore[assignment]
        hooks.alpha = 0.0  # weight 0: the running statistics as they are (ema) or the source's (mix)
        before = self.inner.step(x).logits
        if self._variety is None:
            self._variety = BatchVariety(before.shape[1], prior=max(self.batch_size, before.shape[1]))
        ratio = self._variety.ratio(before.argmax(1).cpu())
        alpha = batch_alpha(ratio, self.config.bn_alpha_max, self.config.variety_floor)
        self.alphas.append(alpha)
        if alpha == 0.0:
            return StepResult(logits=before, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))
        hooks.alpha = alpha
        return self.inner.step(x)

    @torch.no_grad()
    def _step_bn_choose(self, x: torch.Tensor) -> StepResult:
        """The prediction with the source, the batch's or the stream's running statistics, whichever
        has the lowest mean entropy; near ties mix them (``norm`` steps: the model is not updated)."""
        hooks: BatchNormStats = self.inner._bn_hooks  # type: ignore[assignment]
        hooks.paused = True
        try:
            source = self.inner.step(x)
        finally:
            hooks.paused = False
        # one image's own statistics normalise each image alone, not the domain: at batch size 1 the
        # batch statistics are no candidate, and the class-balanced stream's (per-image moments) are
        alone = x.shape[0] == 1
        if alone and not isinstance(self._stream_stats, ClassBalancedStats):
            self._choice_batches += 1  # all the weight on the source statistics
            return source
        candidates = [source, source if alone else self.inner.step(x)]
        sums = [softmax_entropy(c.logits.float()).sum() for c in candidates]
        if alone:
            sums[1] = torch.full_like(sums[1], math.inf)  # weight 0 for the batch statistics
        if self.stream_model is not None:
            stream = self._stream_step(x, self._class_labels(candidates, torch.stack(sums) / x.shape[0], alone))
            candidates.append(stream)
            sums.append(softmax_entropy(stream.logits.float()).sum())
        if self._entropy_window is None:
            window = self.config.bn_choice_window or (STREAM_MOMENTUM_IMAGES if self.stream_model is not None else 1)
            self._entropy_window = EntropyWindow(window)
        entropies = self._entropy_window.add(torch.stack(sums), x.shape[0])
        weights = self._choice_weights(entropies, source.logits.shape[1])
        self._choice_weights_sum = weights if self._choice_weights_sum is None else self._choice_weights_sum + weights
        self._choice_batches += 1
        if self.config.bn_choice_temperature == 0.0:
            return candidates[int(weights.argmax())]
        mixed = sum(w * c.logits.float().softmax(1) for w, c in zip(weights, candidates, strict=True))
        return StepResult(logits=mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log(),  # type: ignore[union-attr]
                          used=candidates[1].used)

    def choice_shares(self) -> dict[str, float]:
        """The mean weight of the batch (and stream) statistics' predictions over the batches seen
        (a batch of one image gives the batch statistics none of it)."""
        if not self._choice_batches:
            return {}
        names = ["batch_statistics_share"] + (["stream_statistics_share"] if self.stream_model is not None else [])
        sums = self._choice_weights_sum[1:].tolist() if self._choice_weights_sum is not None else [0.0] * len(names)
        return {name: value / self._choice_batches for name, value in zip(names, sums, strict=True)}

    def _choice_weights(self, entropies: torch.Tensor, num_classes: int) -> torch.Tensor:
        """One-hot on the lowest entropy, or softmax(-H / (t ln C)) with t = bn_choice_temperature."""
        temperature = self.config.bn_choice_temperature
        if temperature == 0.0:
            return torch.nn.functional.one_hot(entropies.argmin(), len(entropies)).float()
        return torch.softmax(-entropies.float() / (temperature * math.log(max(num_classes, 2))), 0)

    def _class_labels(self, candidates: list[StepResult], entropies: torch.Tensor, alone: bool) -> torch.Tensor:
        """Each image's class for the class-balanced stream statistics (``bn_stream_labels``);
        ``entropies``: the source and batch predictions' mean entropies."""
        source, batch = candidates
        if self.config.bn_stream_labels == "source" or alone:
            return source.logits.argmax(1)
        weights = self._choice_weights(entropies, source.logits.shape[1])
        return (weights[0] * source.logits.float().softmax(1) + weights[1] * batch.logits.float().softmax(1)).argmax(1)

    def _stream_step(self, x: torch.Tensor, labels: torch.Tensor) -> StepResult:
        assert self.stream_model is not None
        if isinstance(self._stream_stats, ClassBalancedStats):
            self._stream_stats.labels = labels
        with self.inner.autocast():
            logits = self.stream_model(self.inner.prepare_input(x)).float()
        if isinstance(self._stream_stats, BatchNormStats):
            # the momentum is per 64 images, so the statistics remember as many images at any batch size
            images = x.shape[0] / STREAM_MOMENTUM_IMAGES
            self._stream_stats.alpha = 1.0 - (1.0 - self.config.bn_stream_momentum) ** images
        return StepResult(logits=logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))

    def _step_guarded(self, x: torch.Tensor) -> StepResult:
        if self.frozen_at is not None:
            return self._source_step(x)
        result = self.inner.step(x)
        if self.reference is None:
            return result
        source_logits = self._source_logits(x)
        if self._guard is None:
            window = self.config.window or max(256, 2 * self.batch_size, 8 * source_logits.shape[1])
            self._guard = _Guard(source_logits.shape[1], window)
        signals = self._guard.add(result.logits.detach().float(), source_logits)
        if signals is not None:
            self._on_collapse(signals)
        return result

    def _on_collapse(self, signals: dict[str, float]) -> None:
        frozen = len(self.collapse_events) + 1 >= self.config.max_collapses
        self.collapse_events.append({"batch": self.batches_seen, "action": "source" if frozen else "reset",
                                     "signals": {k: round(v, 4) for k, v in signals.items()}})
        self.inner.reset()
        if frozen:
            self.frozen_at = self.batches_seen

    @torch.no_grad()
    def _source_logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None
        with self.inner.autocast():
            return self.reference(self.inner.prepare_input(x)).float()

    def _source_step(self, x: torch.Tensor) -> StepResult:
        logits = self._source_logits(x) if self.reference is not None else self.inner.model(x)
        return StepResult(logits=logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))

    # --- records ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"inner": self.inner.stats(), "guard_events": self.collapse_events,
                                 "source_from_batch": self.frozen_at}
        if self.alphas:
            stats["bn_alpha_mean"] = sum(self.alphas) / len(self.alphas)
        stats.update(self.choice_shares())
        return stats

    def describe(self) -> dict[str, Any]:
        info = self.inner.describe()
        info["inner"] = info["method"]
        info["inner_config"] = info["config"]
        info.update(method=self.name, config=dict(vars(self.config)), choice=self.choice)
        return info
