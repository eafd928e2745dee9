"""Helpers shared by the method tests: tiny random timm models, random streams, running a method."""

from __future__ import annotations

import math

import timm
import torch

from tta_cli.methods import create_method
from tta_cli.methods.base import TTAMethod, softmax_entropy


def tiny_model(arch: str) -> torch.nn.Module:
    """A random-weight timm test model with 10 classes, the same for every call."""
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if arch == "test_vit" else {}
    return timm.create_model(arch, pretrained=False, num_classes=10, **kwargs)


def random_stream(n_batches: int = 4, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=g) * 2 for _ in range(n_batches)]


def half_reliable_margin(arch: str, stream: list[torch.Tensor]) -> float:
    """A margin factor that makes about half of the samples reliable on the source model, so that
    the filters select some samples and not others (random models are uncertain everywhere)."""
    with torch.no_grad():
        entropy = torch.cat([softmax_entropy(tiny_model(arch).eval()(x)) for x in stream])
    return float(entropy.median()) / math.log(10) + 1e-6


def run_method(name: str, arch: str, stream: list[torch.Tensor], reads_free: bool = True,
               **config: object) -> tuple[TTAMethod, list[torch.Tensor], list[torch.Tensor]]:
    """The method over the stream (lr 0.05): the method, the logits and the used masks per batch.

    ``reads_free=False`` is what a GPU run does: decide on the device, never read a count back.
    """
    method = create_method(name, tiny_model(arch), batch_size=stream[0].shape[0], lr=0.05, **config)
    if not reads_free:
        method.reads_are_free = lambda tensor: False  # type: ignore[method-assign]
    logits, used = [], []
    for x in stream:
        result = method.step(x)
        logits.append(result.logits)
        used.append(result.used)
    return method, logits, used


def max_param_diff(a: TTAMethod, b: TTAMethod) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.params, b.params, strict=True))
