"""cotta: continual test-time domain adaptation.

Wang, Fink, Van Gool, Dai. "Continual Test-Time Domain Adaptation", CVPR 2022.
https://arxiv.org/abs/2203.13591 (code: qinenergy/cotta; this follows its port in
mariodoebler/test-time-adaptation; docs/METHODS.md, "cotta").

A student learns every parameter from a mean teacher's predictions; the teacher averages the
student (EMA), an anchor (the frozen source model) decides whether the teacher's prediction is
averaged over augmentations, and a stochastic restore resets a small random share of the student's
weights to the source values after each step, against forgetting. Per batch:

    z = student(x);  c = mean_i max softmax(anchor(x))_i
    t = mean over 32 of teacher(A(x))  if c < threshold,  else teacher(x)      -> the predictions
    loss = mean_i CE(softmax(t_i), z_i);  Adam step;  teacher <- 0.999 teacher + 0.001 student
    every student weight entry <- its source value with probability 0.01

The wrapped model is the teacher: its outputs are the predictions and it is what ``tta`` exports;
the student is exported separately (``extra_exports``). BatchNorm uses batch statistics in all three
models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.methods._registry import register_method
from tta_cli.methods.augment import AUGMENTATION_A, Normalization
from tta_cli.methods.base import StepResult, TTAMethod
from tta_cli.methods.collectives import world
from tta_cli.methods.fastpaths import batch_mean
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import BatchNormStats, weight_bias_parameters
from tta_cli.methods.teacher import AdamConfig, build_adam_or_sgd, ema_update


@dataclass
class CoTTAConfig(AdamConfig):
    """CIFAR defaults of MD and the CoTTA repository. ImageNet-C (MD's config): optimizer=sgd,
    lr=0.01, restore_prob=0.001, confidence_threshold=0.1, loss=symmetric."""

    teacher_momentum: float = field(default=0.999, metadata=between(0.0, 1.0))
    restore_prob: float = field(default=0.01, metadata=between(0.0, 1.0))
    confidence_threshold: float = field(default=0.92, metadata=between(0.0, 1.0))
    """Augment the teacher's input when the anchor's mean confidence is below this."""
    augmentations: int = field(default=32, metadata=at_least(1))
    loss: Literal["ce", "symmetric"] = "ce"
    """ce: cross-entropy to the teacher's soft labels (CIFAR); symmetric: 0.5/0.5 both ways (ImageNet)."""


def teacher_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str) -> torch.Tensor:
    ce = -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)
    if kind == "ce":
        return ce
    reverse = (student_logits.softmax(1) * teacher_logits.log_softmax(1)).sum(1)
    return -0.5 * (teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1) - 0.5 * reverse


@register_method
class CoTTA(TTAMethod):
    name = "cotta"
    data_parallel = True
    resume_attributes = ("augmented_batches",)
    config_class = CoTTAConfig
    amp_aware = True
    predicts_first_forward = False
    """The predictions are the teacher's, averaged over random augmentations on uncertain batches."""
    config: CoTTAConfig

    def __init__(self, model: nn.Module, config: CoTTAConfig | None = None, batch_size: int = 64) -> None:
        super().__init__(model, config, batch_size)
        self.normalization = Normalization.of(model)
        self.augmented_batches = 0
        self.reseed(0)

    # --- setup ------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Teacher (the wrapped model), student and anchor, eval mode, BatchNorm on batch statistics."""
        self.model.eval()
        self.student = copy.deepcopy(self.model)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)
        super().configure_model()  # the teacher's BatchNorm hooks
        self._other_hooks = [BatchNormStats(m, self.bn_mode) for m in (self.student, self.anchor) if self.bn_mode]
        self.student.requires_grad_(False)
        self.student_params = [p for _, p in weight_bias_parameters(self.student)]
        for p in self.student_params:
            p.requires_grad_(True)

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every weight and bias (the teacher's names; the student's twins are optimised)."""
        return weight_bias_parameters(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_adam_or_sgd(self.student_params, self.config, self.lr)

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        super().configure_performance(precision, channels_last, compile)
        for model in (self.student, self.anchor):
            if channels_last:
                model.to(memory_format=torch.channels_last)
            if compile:
                model.compile(**({"backend": compile} if isinstance(compile, str) else {}))

    # --- the algorithm ----------------------------------------------------------------------------

    @torch.enable_grad()
    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        student_logits = self._forward(self.student, x)
        with torch.no_grad():
            teacher_logits = self.teacher_prediction(x)
        loss = batch_mean(teacher_loss(student_logits, teacher_logits, self.config.loss))
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()
        ema_update(self.params, self.student_params, self.config.teacher_momentum)
        self.stochastic_restore()
        used = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return StepResult(logits=teacher_logits, used=used)

    def teacher_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, averaged over augmentations when the anchor is not confident."""
        confidence = world().sum(batch_mean(self._forward(self.anchor, x).softmax(1).max(1)[0]))
        if confidence >= self.config.confidence_threshold:
            return self._forward(self.model, x)
        self.augmented_batches += 1
        rows = world().row_span(x.shape[0])  # data-parallel: each process's rows of every draw
        outputs = [self._forward(self.model, self.normalization.augment(x, self.generator, AUGMENTATION_A, rows))
                   for _ in range(self.config.augmentations)]
        return torch.stack(outputs).mean(0)

    @torch.no_grad()
    def stochastic_restore(self) -> None:
        """Each entry of each weight goes back to its source value with probability ``restore_prob``
        (one ``rand(shape)`` per tensor, in module order, drawn on the CPU generator)."""
        if self.config.restore_prob <= 0:
            return
        for param, source in zip(self.student_params, self.source.params, strict=True):
            mask = (torch.rand(param.shape, generator=self.generator) < self.config.restore_prob).float()
            mask = mask.to(param.device)
            param.copy_(source * mask + param * (1.0 - mask))

    # --- state ------------------------------------------------------------------------------------

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return model(self.prepare_input(x)).float()

    @torch.no_grad()
    def reset(self) -> None:
        """Teacher, student and optimiser to the source (the anchor never changes)."""
        super().reset()
        for param, source in zip(self.student_params, self.source.params, strict=True):
            param.copy_(source)

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        state = self.student.state_dict()
        return {"student.safetensors": {k: v.detach().clone(memory_format=torch.contiguous_format)
                                        for k, v in state.items()}}

    def stats(self) -> dict[str, Any]:
        return {"augmented_batches": self.augmented_batches}

    def close(self) -> None:
        for hooks in self._other_hooks:
            hooks.remove()
        self._other_hooks = []
        super().close()
