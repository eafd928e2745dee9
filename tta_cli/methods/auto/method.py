"""auto: chooses a method and its settings from what it can see without labels, and guards it.

The registered ``auto``: what ``policy`` chooses for the model, run as a ``WrappingMethod`` around
one of the project's faithful methods (``bn_choice`` on BatchNorm models, ``guard`` on the others).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.collapse_window import frozen_copy
from tta_cli.methods._registry import create_method, register_method
from tta_cli.methods.auto.bn_choice import BatchNormChoice
from tta_cli.methods.auto.guard import HARM_POINTS, Guard
from tta_cli.methods.auto.policy import choose, model_norm_kind
from tta_cli.methods.base import MethodConfig, StepResult
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.wrapper import WrappingMethod

InnerChoice = Literal["auto", "source", "tent", "eta", "sar", "deyo", "roid", "rdumb", "zerosiam", "come", "lame"]


@dataclass
class AutoConfig(MethodConfig):
    inner: InnerChoice = "auto"
    """The method for batch-independent (GroupNorm / LayerNorm / no-norm) models; auto: measured."""
    bn_stats: Literal["choose"] = "choose"
    """BatchNorm models: per batch, the source statistics, the batch's own or the stream's
    (``bn_stream``), whichever predicts with the lowest mean entropy (other rules were measured and
    dropped: docs/BENCHMARKS.md)."""
    bn_choice_temperature: float = field(default=0.005, metadata=at_least(0.0))
    """BatchNorm models: 0 keeps the lowest-entropy prediction; t > 0 mixes the candidates'
    probabilities with weights softmax(-H / (t ln C)) (H: their mean entropies), so a near tie,
    where the choice is a coin toss, takes them all."""
    bn_stream: Literal["balanced", "off"] = "balanced"
    """BatchNorm models: balanced adds a third candidate, the prediction with class-balanced running
    statistics of the stream so far (``bn_choice.ClassBalancedStats``; the source's stand in for
    classes not seen yet); off: only the source and the batch statistics."""
    bn_stream_labels: Literal["choice", "source"] = "choice"
    """``bn_stream=balanced``: the class each image counts for. choice: the argmax of the source and
    batch statistics' predictions mixed as they are chosen (each batch alone; better labels on a
    shifted stream, the source's on a batch of few classes); source: the source model's."""
    bn_stream_prior_images: float = field(default=320.0, metadata=at_least(0.0))
    """``bn_stream=balanced``: the source statistics count as this many images of the stream, shared
    by the C classes: each class's moments count as its images so far against ``prior / C`` images'
    worth of the source's, so classes seen on few images stay near the source's and a shuffled
    stream moves the statistics half-way after this many images whatever C is (0: a class's first
    images count fully; 320 is the 32 per class chosen on CIFAR-10, docs/BENCHMARKS.md, "auto v5"
    and "the stream statistics' prior in images of the stream")."""
    bn_stream_momentum: float = field(default=0.1, metadata=between(0.0, 1.0, low_inclusive=False))
    """The stream statistics' momentum per 64 images (``bn_choice.STREAM_MOMENTUM_IMAGES``)."""
    bn_choice_window: int = field(default=0, metadata=at_least(0))
    """BatchNorm models: the mean entropies compared are over the last batches that hold at least
    this many images, so that batches of a few images are not judged on their own few entropies;
    0: 64 with a stream candidate, 1 (each batch alone) without."""
    bn_source_check: bool = True
    """BatchNorm models: leave out of the choice, per batch, a candidate that flips more of the source
    model's confident predictions over the latest 256 images than the source's probabilities allow
    it to be wrong on (``bn_choice.SourceCheck``; recorded in ``stats()["fallback_batches"]``)."""
    guard: bool = True
    """Batch-independent models: watch for collapse against a frozen source copy (one extra no-grad
    forward per batch)."""
    max_collapses: int = field(default=2, metadata=at_least(1))
    """After this many collapse events, stop adapting and predict with the source model."""
    window: int = field(default=0, metadata=at_least(0))
    """Images in the guard's window; 0: max(256, 2 B, 8 C)."""
    harm_points: float = field(default=HARM_POINTS, metadata=at_least(0.0))
    """The guard's source fallback: batches whose window's label-free estimate of the accuracy
    change (``tta_cli.trust``) is at or below minus this many points are predicted by the source
    copy; 0: off."""
    judge_first: bool = True
    """With the harm fallback: the source copy predicts until the guard's first window is full, so
    that the inner method's predictions are used only once a window of them has been judged."""
    source_ensemble: bool = True
    """Batch-independent models, with the guard: the batches the inner method predicts are predicted
    by the mean of its probabilities and the source copy's (both through the inner method's output
    step, e.g. ROID's prior correction): an output ensemble that holds the source's confident
    predictions where adapting does not help (docs/BENCHMARKS.md)."""
    few_classes: bool = True
    """Batch-independent models, with the guard: LAME (on the source copy's features) predicts the
    batches whose source predictions hold at most half the effective classes of the stretch of stream
    around them (``few_classes``: class-ordered and label-correlated streams); the inner method goes
    on adapting."""
    domain_change: bool = True
    """Batch-independent models, with the guard: the inner method restarts from the source model where
    the input's low-level statistics (the source copy's first normalisation layer) show a new domain
    (``domain_change``: continual streams, where it drifts from one corruption into the next;
    docs/BENCHMARKS.md)."""


@register_method
class Auto(WrappingMethod):
    """Chooses a method and its settings from what it can see without labels, and guards it.

    Not a paper's method: a policy over the project's faithful methods, chosen by measurement on the
    wild benchmark (``docs/METHODS.md``, "auto"; ``docs/BENCHMARKS.md``). BatchNorm models: a
    ``norm`` method whose predictions are chosen per batch among BatchNorm statistics
    (``bn_choice``); others: the inner method (``AutoConfig.inner``) under the ``guard``.
    ``describe()["choice"]`` records what was chosen and why; ``tta adapt`` prints it.

    Data-parallel: the inner methods are; the choice among BatchNorm statistics sums its entropies,
    checks and stream moments over the processes, and the guard judges the gathered global batch
    (docs/DISTRIBUTED.md)."""

    name = "auto"
    config_class = AutoConfig
    data_parallel = True
    config: AutoConfig

    def __init__(self, model: nn.Module, config: AutoConfig | None = None, batch_size: int = 64) -> None:
        config = config if config is not None else AutoConfig()
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        kind = model_norm_kind(model)
        choice = choose(kind, max(num_classes, 2), config.inner, config.bn_stream, config.few_classes and config.guard,
                        config.source_ensemble and config.guard, config.domain_change and config.guard)
        # the frozen copies are of the source model as it comes, before the inner method wraps it
        batchnorm = kind == "batchnorm"
        reference = frozen_copy(model) if config.guard and not batchnorm else None
        stream_model = frozen_copy(model) if batchnorm and config.bn_stream != "off" else None
        if batchnorm:
            inner = create_method("norm", model, batch_size=batch_size, bn_stats="batch", bn_alpha=0.0)
        else:
            inner = create_method(choice["method"], model, batch_size=batch_size)
        super().__init__(inner, config, batch_size)
        self.num_classes, self.kind, self.choice = num_classes, kind, choice
        self.bn_choice = BatchNormChoice(
            inner, stream_model, max(num_classes, 2), config.bn_choice_temperature, config.bn_choice_window,
            config.bn_stream_momentum, config.bn_stream_prior_images / max(num_classes, 2), config.bn_stream_labels,
            config.bn_source_check) if batchnorm else None
        self.guard = Guard(reference, config.max_collapses, config.window, batch_size, harm_points=config.harm_points,
                           judge_first=config.judge_first, few_classes=config.few_classes,
                           source_ensemble=config.source_ensemble, domain_change=config.domain_change) \
            if reference is not None else None

    def step(self, x: torch.Tensor) -> StepResult:
        if self.bn_choice is not None:
            result = self.bn_choice.step(x)
        elif self.guard is not None:
            result = self.guard.step(self.inner, x, self.batches_seen)
        else:
            result = self.inner.step(x)
        self.batches_seen += 1
        return result

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """A batch's logits without adapting on it (the online view's batches in between): the
        BatchNorm choice (which learns nothing but its stream statistics), or the guard's model."""
        if self.bn_choice is not None:
            logits = self.bn_choice.step(x).logits
        elif self.guard is not None:
            logits = self.guard.predict(self.inner, x, self.batches_seen)
        else:
            logits = self.inner.run_model(x)
        self.batches_seen += 1
        return logits

    def state_for_resume(self) -> dict[str, Any]:
        """The inner method's state, with the guard's windows and records (or the BatchNorm choice's
        windows and stream statistics) and the batch count, so that a resumed run chooses, judges and
        falls back as an uninterrupted one."""
        state = self.inner.state_for_resume()
        state["auto"] = {"batches_seen": self.batches_seen,
                         "guard": self.guard.state() if self.guard is not None else None,
                         "bn_choice": self.bn_choice.state() if self.bn_choice is not None else None}
        return state

    @torch.no_grad()
    def load_resume_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        own = state.pop("auto", None)
        self.inner.load_resume_state(state)
        if own is None:
            return
        self.batches_seen = int(own["batches_seen"])
        if self.guard is not None and own.get("guard") is not None:
            self.guard.load_state(own["guard"])
        if self.bn_choice is not None and own.get("bn_choice") is not None:
            self.bn_choice.load_state(own["bn_choice"])

    @property
    def stream_model(self) -> nn.Module | None:
        """BatchNorm models: the frozen copy with the stream's statistics (None without)."""
        return self.bn_choice.stream_model if self.bn_choice is not None else None

    @property
    def collapse_events(self) -> list[dict[str, Any]]:
        return self.guard.events if self.guard is not None else []

    @property
    def frozen_at(self) -> int | None:
        return self.guard.frozen_at if self.guard is not None else None

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        super().configure_performance(precision, channels_last, compile)
        copies = [self.guard.reference if self.guard else None, self.stream_model]
        for frozen in copies:
            if frozen is not None and channels_last:
                frozen.to(memory_format=torch.channels_last)

    def stream_bn_statistics(self) -> dict[str, torch.Tensor]:
        """The stream candidate's statistics when the run predicted mostly with test statistics
        (``BatchNormChoice.export_statistics``); else none (the source's)."""
        return self.bn_choice.export_statistics() if self.bn_choice is not None else {}

    def close(self) -> None:
        super().close()
        if self.bn_choice is not None:
            self.bn_choice.close()
        if self.guard is not None:
            self.guard.close()

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"inner": self.inner.stats(), "guard_events": self.collapse_events,
                                 "source_from_batch": self.frozen_at}
        if self.bn_choice is not None:
            stats.update(self.bn_choice.stats())
        if self.guard is not None:
            stats.update(self.guard.stats())
        return stats

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"choice": self.choice}
