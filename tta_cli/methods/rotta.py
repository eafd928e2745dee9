"""rotta: robust test-time adaptation in dynamic scenarios.

Yuan, Xie, Li. "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023.
https://arxiv.org/abs/2303.13899 (code: BIT-DA/RoTTA; this follows its port in
mariodoebler/test-time-adaptation, which predicts bit for bit the same; docs/METHODS.md, "rotta").

Every BatchNorm becomes a robust BN (statistics blended into a running estimate, momentum alpha).
A teacher (an EMA of the student) predicts; each test sample enters a class-balanced memory bank
(category-balanced sampling with timeliness and uncertainty, CSTU) under the teacher's pseudo-label;
every ``update_every`` samples the student learns from the memory:

    loss = mean_i  sigmoid(-age_i / N) * CE(softmax(teacher(M_i)), student(A(M_i)))

with A the CoTTA augmentation, then teacher <- (1 - nu) teacher + nu student.

The wrapped model is the teacher: its logits are the predictions and it is what ``tta`` exports,
with the robust-BN statistics as its BN running statistics (``bn_stats`` is therefore ``ema``).
The student is exported separately (``extra_exports``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods._registry import register_method
from tta_cli.methods.augment import AUGMENTATION_A, Normalization
from tta_cli.methods.base import StepResult, TTAMethod
from tta_cli.methods.collectives import world
from tta_cli.methods.fastpaths import batch_mean
from tta_cli.methods.hyperparameters import at_least, between
from tta_cli.methods.selection import affine_parameters
from tta_cli.methods.teacher import AdamConfig, RobustBatchNorm, build_adam_or_sgd, ema_update


@dataclass
class RoTTAConfig(AdamConfig):
    bn_stats: Literal["ema"] = "ema"
    """RoTTA's robust BN: running statistics moved by every update, predicted with and exported."""
    memory_size: int = field(default=64, metadata=at_least(1))
    update_every: int = field(default=64, metadata=at_least(1))
    """An update after every this many samples (not batches)."""
    nu: float = field(default=0.001, metadata=between(0.0, 1.0))
    """Teacher EMA: teacher <- (1 - nu) teacher + nu student."""
    alpha: float = field(default=0.05, metadata=between(0.0, 1.0))
    """Robust-BN momentum."""
    lambda_t: float = field(default=1.0, metadata=at_least(0.0))
    lambda_u: float = field(default=1.0, metadata=at_least(0.0))


@dataclass
class MemoryItem:
    image: torch.Tensor
    uncertainty: float
    age: int = 0


@dataclass
class ClassBalancedMemory:
    """CSTU: at most ``capacity`` items, ``capacity / C`` per class before classes compete."""

    capacity: int
    num_classes: int
    lambda_t: float = 1.0
    lambda_u: float = 1.0
    classes: list[list[MemoryItem]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = [[] for _ in range(self.num_classes)]

    def __len__(self) -> int:
        return sum(len(items) for items in self.classes)

    def score(self, age: int, uncertainty: float) -> float:
        """High for old and uncertain items: they are evicted first."""
        return (self.lambda_t * 1 / (1 + math.exp(-age / self.capacity))
                + self.lambda_u * uncertainty / math.log(self.num_classes))

    def add(self, image: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Insert if there is room or a worse item to evict; then every stored item ages by one."""
        accepted = self._make_room(label, self.score(0, uncertainty))
        if accepted:
            self.classes[label].append(MemoryItem(image.clone(), uncertainty))  # not a view of the batch
        for items in self.classes:
            for item in items:
                item.age += 1
        return accepted

    def _make_room(self, label: int, new_score: float) -> bool:
        if len(self.classes[label]) >= self.capacity / self.num_classes:
            return self._evict_from([label], new_score)
        if len(self) < self.capacity:
            return True
        counts = [len(items) for items in self.classes]
        majority = [c for c, n in enumerate(counts) if n == max(counts)]
        return self._evict_from(majority, new_score)

    def _evict_from(self, candidates: list[int], new_score: float) -> bool:
        """Drop the highest-scoring item (the last one on ties) if it scores above the new one."""
        best: tuple[float, int, int] | None = None
        for c in candidates:
            for i, item in enumerate(self.classes[c]):
                s = self.score(item.age, item.uncertainty)
                if best is None or s >= best[0]:
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] > new_score:
            self.classes[best[1]].pop(best[2])
            return True
        return False

    def contents(self) -> tuple[list[torch.Tensor], list[float]]:
        """Images class by class in insertion order, and their ages / capacity."""
        items = [item for items in self.classes for item in items]
        return [item.image for item in items], [item.age / self.capacity for item in items]


def timeliness_weight(ages: list[float], device: torch.device) -> torch.Tensor:
    """exp(-a) / (1 + exp(-a)): older memory items count less."""
    a = torch.tensor(ages).float().to(device)
    return torch.exp(-a) / (1 + torch.exp(-a))


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


@register_method
class RoTTA(TTAMethod):
    name = "rotta"
    data_parallel = True
    resume_attributes = ("samples_seen", "updates", "memory")
    config_class = RoTTAConfig
    amp_aware = True
    config: RoTTAConfig

    def __init__(self, model: nn.Module, config: RoTTAConfig | None = None, batch_size: int = 64) -> None:
        if config is not None and config.bn_stats != "ema":
            raise TTAError(f"rotta has no bn_stats={config.bn_stats}", "its robust BatchNorm is an EMA (ema)")
        super().__init__(model, config, batch_size)
        self.num_classes = int(model.num_classes) if hasattr(model, "num_classes") else None
        self.normalization = Normalization.of(model)
        self.memory: ClassBalancedMemory | None = None
        self.samples_seen = 0
        self.updates = 0
        self.reseed(0)

    # --- setup ------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Teacher (the wrapped model) and student, each with its own robust BN, in eval mode.

        The authors switch both to train mode for the update; here the robust BN's update flag does
        that job, so dropout / drop-path stay off (identical on models without them).
        """
        self.model.eval()
        self.student = copy.deepcopy(self.model)
        self._bn_hooks = None
        self.teacher_bn = RobustBatchNorm(self.model, self.config.alpha)
        self.student_bn = RobustBatchNorm(self.student, self.config.alpha)
        self.student.requires_grad_(False)
        self.student_params = [p for _, p in affine_parameters(self.student)]
        for p in self.student_params:
            p.requires_grad_(True)

    def collect_params(self) -> list[tuple[str, nn.Parameter]]:
        """The teacher's norm affine parameters (the student's twins are the ones optimised)."""
        return affine_parameters(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_adam_or_sgd(self.student_params, self.config, self.lr)

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        super().configure_performance(precision, channels_last, compile)
        if channels_last:
            self.student.to(memory_format=torch.channels_last)
        if compile:
            self.student.compile(**({"backend": compile} if isinstance(compile, str) else {}))

    # --- the algorithm ----------------------------------------------------------------------------

    def forward_and_adapt(self, x: torch.Tensor) -> StepResult:
        with torch.no_grad():
            logits = self._forward(self.model, x)
            # data-parallel: every process keeps the whole memory, filled from the global batch in
            # stream order, so each takes the same decisions (and its share of each update)
            images, all_logits = world().gather_rows(x), world().gather_rows(logits)
            probs = all_logits.softmax(1)
            labels = probs.argmax(1).tolist()
            uncertainty = (-probs * torch.log(probs + 1e-6)).sum(1).tolist()
        memory = self._memory(logits.shape[1])
        used = []
        for image, label, u in zip(images, labels, uncertainty, strict=True):
            used.append(memory.add(image, label, u))
            self.samples_seen += 1
            if self.samples_seen % self.config.update_every == 0:
                self.update_from_memory()
        first, _ = world().row_span(x.shape[0])
        mine = used[first:first + x.shape[0]]
        return StepResult(logits=logits, used=torch.tensor(mine, dtype=torch.bool, device=x.device))

    @torch.enable_grad()
    def update_from_memory(self) -> None:
        """One step on the memory; data-parallel, each process forwards its share of the memory
        (robust BN on the whole memory's statistics, the loss its share of the memory's mean)."""
        images, ages = self._memory(0).contents()
        if not images:
            return
        start, stop = world().part(len(images))
        memory = torch.stack(images[start:stop]) if stop > start else images[0].new_zeros((0, *images[0].shape))
        augmented = self.normalization.augment(memory, self.generator, AUGMENTATION_A, (start, len(images)))
        self.teacher_bn.update = self.student_bn.update = True
        try:
            with torch.no_grad():
                teacher_logits = self._forward(self.model, memory)
            student_logits = self._forward(self.student, augmented)
        finally:
            self.teacher_bn.update = self.student_bn.update = False
        weights = timeliness_weight(ages[start:stop], memory.device)
        loss = batch_mean(soft_cross_entropy(student_logits, teacher_logits) * weights)
        self.backward(loss)
        self.optimizer_step()
        self.optimizer.zero_grad()
        ema_update(self.params, self.student_params, 1 - self.config.nu)
        self.updates += 1

    # --- state ------------------------------------------------------------------------------------

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return model(self.prepare_input(x)).float()

    def _memory(self, num_classes: int) -> ClassBalancedMemory:
        if self.memory is None:
            c = self.num_classes or num_classes
            self.memory = ClassBalancedMemory(self.config.memory_size, c, self.config.lambda_t, self.config.lambda_u)
        return self.memory

    @torch.no_grad()
    def reset(self) -> None:
        """Teacher, student (parameters and robust-BN statistics), optimiser and memory to the start."""
        super().reset()
        for param, source in zip(self.student_params, self.source.params, strict=True):
            param.copy_(source)
        for name, buffer in self.student.named_buffers():
            if name in self.source.buffers:
                buffer.copy_(self.source.buffers[name])
        self.memory = None
        self.samples_seen = 0

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """The student, as a plain timm state dict (its robust-BN statistics as running statistics)."""
        state = self.student.state_dict()
        return {"student.safetensors": {k: v.detach().clone(memory_format=torch.contiguous_format)
                                        for k, v in state.items()}}

    def stats(self) -> dict[str, Any]:
        return {"updates": self.updates, "memory": len(self.memory) if self.memory is not None else 0}

    def close(self) -> None:
        self.teacher_bn.remove()
        self.student_bn.remove()
        super().close()
