"""auto on BatchNorm models: per batch, the prediction with the best of several BatchNorm statistics.

Nothing is learned. Each batch is predicted with the source statistics, the batch's own (``norm``)
and, as a third candidate, the stream's so far balanced over the classes (``ClassBalancedStats``:
running moments per predicted class, averaged over all the classes, the source's standing in for
classes not seen yet). The prediction with the lowest mean entropy over the latest 64 or more images
is kept; near ties, within about ``bn_choice_temperature`` ln C, mix the predictions' probabilities.

Why these candidates (docs/BENCHMARKS.md, "auto v5" and the sections before it): no statistics are
blended with the source's per layer and batch (that breaks EfficientNet-Lite0); the batch's own take
a new corruption at once; the stream's keep what batches of few classes (label shift, correlated
labels, small batches) lack, and being balanced over the classes they do not become the statistics
of the classes seen last, as a plain running mean does. At batch size 1 the batch statistics are no
candidate.

Data-parallel (``torchrun``), each process holds some rows of the batch and every choice is the
global batch's, alike on every process: the entropy sums, the source check's sums and the stream's
per-class moments are summed over the processes (the helpers under "the global batch" below; the
inner ``norm`` normalises with the global batch's statistics itself).
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tta_cli.methods.base import StepResult, TTAMethod, softmax_entropy
from tta_cli.methods.collectives import world
from tta_cli.methods.selection import batchnorm_layers

STREAM_MOMENTUM_IMAGES = 64
"""``bn_stream_momentum`` is the weight of a batch of this many images (1 - (1 - m)^(B / 64) for B)."""
CHECK_WINDOW_IMAGES = 512
"""``SourceCheck`` judges each candidate over the latest batches holding at least this many images."""
MAX_RECORDED_FALLBACKS = 1000
"""``stats()["fallback_batches"]`` lists at most this many batches (run.json stays small)."""
INPUT_SHIFT = math.log(4.0)
"""``SourceCheck`` trusts the source's confidence while the variance of every channel of the first
BatchNorm's input (which depends on no statistics) is within this factor of the source's."""


# --- the global batch: sums over every process's rows (in one process, the local values) ----------


def _global_means(*values: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor's mean over its rows, over the global batch (data-parallel: one sum)."""
    if not world().active:
        return [v.mean(0) for v in values]
    rows = values[0].new_tensor([float(values[0].shape[0])])
    sums = world().sum(torch.cat([*(v.sum(0) for v in values), rows]))
    return [part / sums[-1].clamp_min(1) for part in sums[:-1].split([v.shape[1] for v in values])]


def _global_sum_and_count(values: torch.Tensor) -> tuple[float, int]:
    """The sum of ``values`` (one per image) and the images, over the global batch."""
    if not world().active:
        return float(values.sum()), len(values)
    total = world().sum(torch.stack([values.sum(), values.new_tensor(float(len(values)))]))
    return float(total[0]), int(total[1])


def _global_class_sums(onehot: torch.Tensor, means: torch.Tensor,
                       squares: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class (``onehot``: each image's): the sums of the images' channel means and mean squares,
    and the images, over the global batch (data-parallel: one sum)."""
    sums = onehot.T @ means, onehot.T @ squares, onehot.sum(0)
    if not world().active:
        return sums
    channels = means.shape[1]
    total = world().sum(torch.cat([sums[0], sums[1], sums[2][:, None]], 1))
    return total[:, :channels], total[:, channels:2 * channels], total[:, -1]


def _masked(entropies: torch.Tensor, left_out: list[bool]) -> torch.Tensor:
    """``entropies`` made infinite (weight 0 in the choice) where ``left_out``."""
    if not any(left_out):
        return entropies
    return entropies.masked_fill(torch.tensor(left_out, device=entropies.device), math.inf)


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
        flat = x.flatten(2)  # (B, channels, values); also for a process with no row
        # (B, channels); a sum and a norm are vectorised reductions, ten times faster than var_mean here
        means = flat.mean(2)
        squares = torch.linalg.vector_norm(flat, 2, dim=2) ** 2 / flat.shape[2]
        onehot = torch.nn.functional.one_hot(self.labels, self.num_classes).to(x)  # (B, C)
        mean_sums, square_sums, counts = _global_class_sums(onehot, means, squares)
        present = counts > 0
        batch_means = mean_sums / counts.clamp_min(1)[:, None]
        batch_squares = square_sums / counts.clamp_min(1)[:, None]
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

    def state(self, layers: list[nn.Module]) -> list[list[torch.Tensor] | None]:
        """Each layer's per-class moments (in ``layers``' order), for ``--resume``."""
        return [[t.clone() for t in self._moments[id(layer)]] if id(layer) in self._moments else None
                for layer in layers]

    def load_state(self, layers: list[nn.Module], state: list[list[torch.Tensor] | None]) -> None:
        for layer, moments in zip(layers, state, strict=True):
            if moments is not None:
                device = layer.running_mean.device
                self._moments[id(layer)] = (moments[0].to(device), moments[1].to(device), moments[2].to(device))

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


class SourceCheck:
    """Which candidates the source model's confident predictions rule out, over the recent images.

    A candidate that changes only the source's wrong predictions flips each image with probability
    at most 1 - p (p: the source's probability of its class, if the source is calibrated). Counting
    each flip by the source's odds p / (1 - p), such a candidate's flips add up to at most the sum of
    p over the images; a candidate whose odds-weighted flips over the latest ``CHECK_WINDOW_IMAGES``
    images exceed that flips predictions the source is sure of more often than the source can be
    wrong on them, as batch statistics do on batches of one or few classes (they normalise the
    class away), and is left out of the choice. The source's confidence is evidence only near its
    own inputs: under a strong covariate shift (blur, contrast, fog, saturation: some channel of the
    first BatchNorm's input 5 to 40 times off the source's variance) the source is confidently wrong,
    so no candidate is ruled out where a channel's variance is more than ``INPUT_SHIFT`` off
    (class-ordered and mixed streams stay within a factor 3)."""

    def __init__(self, inner: TTAMethod) -> None:
        layers = batchnorm_layers(inner.model)
        self._source_var = layers[0].running_var.detach().clone().float() if layers else None
        self.input_shift: float | None = None
        """The latest batch's largest |log(variance / source variance)| over the first BatchNorm's
        input channels."""
        self._measure = False
        self._handle = layers[0].register_forward_pre_hook(self._pre_hook) if layers else None
        self._batches: collections.deque[tuple[int, float, dict[str, float]]] = collections.deque()
        """Per batch: images, the source's summed confidence, each candidate's odds-weighted flips."""
        self._images = 0
        self._source_pred = self._odds = torch.zeros(0)

    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Meanwhile a forward measures the first BatchNorm's input shift."""
        self._measure = True
        try:
            yield
        finally:
            self._measure = False

    @torch.no_grad()
    def _pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if not self._measure or self._source_var is None:
            return
        x = args[0].float()
        flat = x.flatten(2)  # (B, channels, values); also for a process with no row
        # a mean and a norm over each image's contiguous values: 15 times faster than var over (0, 2, 3)
        squares, means = _global_means(torch.linalg.vector_norm(flat, 2, dim=2) ** 2, flat.mean(2))
        var = squares / flat.shape[2] - means**2
        ratio = var.clamp_min(1e-12) / self._source_var.to(var.device).clamp_min(1e-12)
        self.input_shift = float(ratio.log().abs().max())

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()

    def state(self) -> list[list[Any]]:
        return [[images, confidence, flips] for images, confidence, flips in self._batches]

    def load_state(self, state: list[list[Any]]) -> None:
        self._batches = collections.deque((int(images), float(confidence), dict(flips))
                                          for images, confidence, flips in state)
        self._images = sum(images for images, _, _ in self._batches)

    @torch.no_grad()
    def add_source(self, source_logits: torch.Tensor) -> None:
        """A new batch: the source's predictions and probabilities; then ``rules_out`` per candidate."""
        probs = source_logits.double().softmax(1)
        confidence, self._source_pred = probs.max(1)
        self._odds = confidence / (1.0 - confidence).clamp_min(1e-6)
        confidence_sum, images = _global_sum_and_count(confidence)
        self._batches.append((images, confidence_sum, {}))
        self._images += images
        while self._images - self._batches[0][0] >= CHECK_WINDOW_IMAGES:
            self._images -= self._batches.popleft()[0]

    @torch.no_grad()
    def rules_out(self, key: str, logits: torch.Tensor) -> bool:
        """Whether the candidate ``key`` (this batch's ``logits``) flips the source's confident
        predictions over the recent images more than the source's probabilities allow."""
        flipped = (logits.argmax(1) != self._source_pred).double()
        self._batches[-1][2][key] = float(world().sum(flipped @ self._odds))
        if self.input_shift is not None and self.input_shift > INPUT_SHIFT:
            return False
        return self.weighted_flips(key) > self.allowed_flips()

    def weighted_flips(self, key: str) -> float:
        return sum(flips.get(key, 0.0) for _, _, flips in self._batches)

    def allowed_flips(self) -> float:
        return sum(confidence for _, confidence, _ in self._batches)

    def reason(self, keys: list[str]) -> str:
        flips = ", ".join(f"{key} {self.weighted_flips(key):.0f}" for key in keys)
        return (f"odds-weighted flips of the source's predictions over the last {self._images} images "
                f"({flips}) exceed the {self.allowed_flips():.0f} its probabilities allow "
                f"(first-layer input shift {self.input_shift or 0.0:.2f})")


class BatchNormChoice:
    """The candidates' predictions of each batch and the choice among them.

    ``inner`` is a ``norm`` method on batch statistics (its forwards with the source statistics are
    the source candidate); ``stream_model``, a frozen copy of the source model, adds the
    class-balanced stream candidate (``momentum`` per 64 images, ``prior`` images of the source
    statistics per class); ``temperature`` and ``window`` (0: 64 images with a stream candidate,
    else each batch alone) set how the mean entropies are compared; ``labels`` says which class each
    image counts for in the stream statistics: ``choice`` (the source and batch predictions mixed as
    they are chosen) or ``source``; ``check``: the source's confident predictions may rule candidates
    out (``SourceCheck``)."""

    def __init__(self, inner: TTAMethod, stream_model: nn.Module | None, num_classes: int, temperature: float,
                 window: int, momentum: float, prior: float, labels: str, check: bool = True) -> None:
        self.inner = inner
        self.temperature = temperature
        self.labels = labels
        self.stream_model = stream_model
        self.stream_stats = ClassBalancedStats(stream_model, num_classes, momentum, prior) \
            if stream_model is not None else None
        self.window = window or (STREAM_MOMENTUM_IMAGES if stream_model is not None else 1)
        self._entropies: EntropyWindow | None = None
        self.check = SourceCheck(inner) if check else None
        self.fallbacks: list[dict[str, Any]] = []
        """The first ``MAX_RECORDED_FALLBACKS`` batches where ``check`` left candidates out: index,
        which, and why (``fallback_count`` counts them all)."""
        self.fallback_count = 0
        self.weights_sum: torch.Tensor | None = None
        """Each candidate's weight summed over the batches (source, batch, stream)."""
        self.batches = 0

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> StepResult:
        with self.inner.source_statistics(), self.check.measuring() if self.check else contextlib.nullcontext():
            source = self.inner.step(x)
        # one image's own statistics normalise each image alone, not the domain: at batch size 1 the
        # batch statistics are no candidate, and the class-balanced stream's (per-image moments) are
        images = world().sum_int(x.shape[0])  # the global batch's
        alone = images == 1
        if alone and self.stream_model is None:
            self.batches += 1  # all the weight on the source statistics
            return replace(source, source_logits=source.logits)
        candidates = [source, source if alone else self.inner.step(x)]
        sums = world().sum(torch.stack([softmax_entropy(c.logits.float()).sum() for c in candidates]))
        if alone:
            sums[1] = math.inf  # weight 0 for the batch statistics
        left_out = [False, self._rules_out("batch_statistics", candidates[1], source, alone)]
        if self.stream_model is not None:
            stream = self._stream_step(x, self._class_labels(candidates, _masked(sums / images, left_out), alone))
            candidates.append(stream)
            sums = torch.cat([sums, world().sum(softmax_entropy(stream.logits.float()).sum())[None]])
            left_out.append(self._rules_out("stream_statistics", stream, source, False))
        if self._entropies is None:
            self._entropies = EntropyWindow(self.window)
        entropies = _masked(self._entropies.add(sums, images), left_out)
        if any(left_out):
            self._record_fallback(left_out)
        weights = self._weights(entropies, source.logits.shape[1])
        self.weights_sum = weights if self.weights_sum is None else self.weights_sum + weights
        self.batches += 1
        if self.temperature == 0.0:
            return candidates[int(weights.argmax())]
        mixed: torch.Tensor = sum(w * c.logits.float().softmax(1)  # type: ignore[assignment]
                                  for w, c in zip(weights, candidates, strict=True))
        return StepResult(logits=mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log(), used=candidates[1].used,
                          source_logits=source.logits)

    def _record_fallback(self, left_out: list[bool]) -> None:
        keys = ("source", "batch_statistics", "stream_statistics")[:len(left_out)]
        names = [key for key, out in zip(keys, left_out, strict=True) if out]
        assert self.check is not None
        self.fallback_count += 1
        if len(self.fallbacks) < MAX_RECORDED_FALLBACKS:
            self.fallbacks.append({"batch": self.batches, "left_out": names, "reason": self.check.reason(names)})

    def _rules_out(self, key: str, candidate: StepResult, source: StepResult, alone: bool) -> bool:
        """Whether ``check`` leaves the candidate out of this batch's choice (never at batch size 1's
        batch statistics, which are no candidate)."""
        if self.check is None:
            return False
        if key == "batch_statistics":
            self.check.add_source(source.logits)
        return self.check.rules_out(key, candidate.logits) and not alone

    def _weights(self, entropies: torch.Tensor, num_classes: int) -> torch.Tensor:
        """One-hot on the lowest entropy, or softmax(-H / (t ln C)) with t the temperature."""
        if self.temperature == 0.0:
            return torch.nn.functional.one_hot(entropies.argmin(), len(entropies)).float()
        return torch.softmax(-entropies.float() / (self.temperature * math.log(max(num_classes, 2))), 0)

    def _class_labels(self, candidates: list[StepResult], entropies: torch.Tensor, alone: bool) -> torch.Tensor:
        """Each image's class for the class-balanced stream statistics; ``entropies``: the source
        and batch predictions' mean entropies."""
        source, batch = candidates
        if self.labels == "source" or alone:
            return source.logits.argmax(1)
        weights = self._weights(entropies, source.logits.shape[1])
        return (weights[0] * source.logits.float().softmax(1) + weights[1] * batch.logits.float().softmax(1)).argmax(1)

    def _stream_step(self, x: torch.Tensor, labels: torch.Tensor) -> StepResult:
        assert self.stream_model is not None and self.stream_stats is not None
        self.stream_stats.labels = labels
        with self.inner.autocast():
            logits = self.stream_model(self.inner.prepare_input(x)).float()
        return StepResult(logits=logits, used=torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))

    def shares(self) -> dict[str, float]:
        """The mean weight of the batch (and stream) statistics' predictions over the batches seen
        (a batch of one image gives the batch statistics none of it)."""
        if not self.batches:
            return {}
        names = ["batch_statistics_share"] + (["stream_statistics_share"] if self.stream_model is not None else [])
        sums = self.weights_sum[1:].tolist() if self.weights_sum is not None else [0.0] * len(names)
        return {name: value / self.batches for name, value in zip(names, sums, strict=True)}

    def export_statistics(self) -> dict[str, torch.Tensor]:
        """The stream candidate's statistics once the batch and stream statistics together carried
        most of the weight (a batch's own statistics cannot be exported, the stream's stand for
        them), so the exported model predicts closer to the run; else none (the source's)."""
        shares = self.shares()
        test_share = shares.get("stream_statistics_share", 0.0) + shares.get("batch_statistics_share", 0.0)
        if self.stream_model is None or test_share < 0.5:
            return {}
        return {name: tensor.detach() for name, tensor in self.stream_model.state_dict().items()
                if name.endswith(("running_mean", "running_var"))}

    def channels_last(self) -> None:
        if self.stream_model is not None:
            self.stream_model.to(memory_format=torch.channels_last)

    def close(self) -> None:
        if self.stream_stats is not None:
            self.stream_stats.remove()
        if self.check is not None:
            self.check.remove()

    def state(self) -> dict[str, Any]:
        """Everything the next batch depends on, and the records, as plain data (``--resume``)."""
        layers = batchnorm_layers(self.stream_model) if self.stream_model is not None else []
        return {"batches": self.batches, "fallbacks": self.fallbacks, "fallback_count": self.fallback_count,
                "weights_sum": self.weights_sum,
                "entropies": [[n, sums] for n, sums in self._entropies.batches] if self._entropies else None,
                "check": self.check.state() if self.check is not None else None,
                "stream": self.stream_stats.state(layers) if self.stream_stats is not None else None,
                "stream_buffers": [[layer.running_mean.clone(), layer.running_var.clone()] for layer in layers]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.batches, self.fallbacks = int(state["batches"]), state["fallbacks"]
        device = self.inner.device
        self.fallback_count = int(state["fallback_count"])
        self.weights_sum = state["weights_sum"].to(device) if state["weights_sum"] is not None else None
        if state["entropies"] is not None:
            self._entropies = EntropyWindow(self.window)
            for count, sums in state["entropies"]:
                self._entropies.add(sums.to(device), int(count))
        if self.check is not None and state["check"] is not None:
            self.check.load_state(state["check"])
        if self.stream_stats is not None and self.stream_model is not None:
            layers = batchnorm_layers(self.stream_model)
            self.stream_stats.load_state(layers, state["stream"])
            for layer, (mean, var) in zip(layers, state["stream_buffers"], strict=True):
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)

    def stats(self) -> dict[str, Any]:
        """The shares, and the batches where the source's confident predictions ruled candidates out."""
        if self.check is None:
            return self.shares()
        return self.shares() | {"fallback_batches": self.fallbacks,
                                "fallback_share": self.fallback_count / self.batches if self.batches else 0.0}
