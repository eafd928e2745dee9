"""The source state a method can return to: reset, and reset decided on the device.

The snapshot is the adapted tensors and the optimiser state only, never a copy of the whole model:
everything else is frozen, so restoring these restores the source. BatchNorm running statistics
are part of it only where the method writes them (the ``ema`` statistics).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics of a model, by name."""
    return {n: b for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))}


def prime_momentum(optimizer: torch.optim.Optimizer | None) -> None:
    """Create SGD's momentum buffers as zeros before the first step.

    With dampening 0 the first step then computes 0.9 * 0 + g = g, exactly torch's lazily created
    buffer, and every step can be undone on the device (``fastpaths.step_if``).
    """
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)


def momentum_buffers(optimizer: torch.optim.Optimizer | None, params: list[nn.Parameter]) -> list[torch.Tensor]:
    if optimizer is None:
        return []
    states = (optimizer.state.get(p, {}) for p in params)
    return [s["momentum_buffer"] for s in states if s.get("momentum_buffer") is not None]


class SourceSnapshot:
    """Copies of the adapted parameters, the written BN buffers and the optimiser state."""

    def __init__(self, params: list[nn.Parameter], buffers: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer | None) -> None:
        self.params = [p.detach().clone() for p in params]
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        self.optimizer: dict[str, Any] | None = copy.deepcopy(optimizer.state_dict()) if optimizer else None

    @torch.no_grad()
    def restore(self, params: list[nn.Parameter], buffers: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer | None) -> None:
        """Put the source values back, bit for bit."""
        for param, source in zip(params, self.params, strict=True):
            param.copy_(source)
        for name, buffer in buffers.items():
            if name in self.buffers:
                buffer.copy_(self.buffers[name])
        if optimizer is not None and self.optimizer is not None:
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))

    @torch.no_grad()
    def restore_where(self, flag: torch.Tensor, params: list[nn.Parameter], buffers: dict[str, torch.Tensor],
                      momentum: list[torch.Tensor]) -> None:
        """``restore`` where the 0-dim bool ``flag`` holds, decided on the device (no host sync).

        ``torch.where`` picks one of its inputs, so the result is bit for bit either the current
        tensors or the source ones. The source momentum is zero (``prime_momentum``), so the
        momentum buffers given are zeroed where ``flag`` holds.
        """
        for param, source in zip(params, self.params, strict=True):
            param.copy_(torch.where(flag, source, param))
        for name, buffer in buffers.items():
            if name in self.buffers:
                buffer.copy_(torch.where(flag, self.buffers[name], buffer))
        for buffer in momentum:
            buffer.masked_fill_(flag, 0.0)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool: no NaN or infinity in any of the tensors (on the first one's device).

    One foreach infinity norm (the largest magnitude, NaN where a NaN is) over all of them, no
    copy: per-tensor ``isfinite().all()`` costs two small kernels per tensor, which at small batches
    with Adam's three tensors per parameter is a measurable share of a step (docs/PERFORMANCE.md).
    """
    device = tensors[0].device
    floating = [t for t in tensors if t.numel() and (t.is_floating_point() or t.is_complex())]
    if not floating:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm(floating, float("inf"))
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.stack(norms).isfinite().all()


class LastGood:
    """The state before the current batch's update, to undo an update that made values non-finite.

    One preallocated copy of the tensors an update writes (the adapted parameters, their momentum,
    written BN buffers), refreshed before every batch: the cost is one copy of those few tensors.
    On the CPU the check is read at once; on a device the restore is a ``torch.where`` (no host
    sync) and the flag is read later with the other device flags.
    """

    def __init__(self) -> None:
        self.copies: list[torch.Tensor] = []

    @torch.no_grad()
    def refresh(self, tensors: list[torch.Tensor]) -> LastGood:
        if [t.shape for t in self.copies] != [t.shape for t in tensors]:
            self.copies = [t.detach().clone() for t in tensors]
        elif tensors:
            torch._foreach_copy_(self.copies, tensors)
        return self

    @torch.no_grad()
    def keep_or_restore(self, logits: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor | bool:
        """Whether ``logits`` and ``tensors`` are all finite; where not, ``tensors`` get the copies back."""
        ok = all_finite([logits, *tensors])
        if ok.device.type == "cpu":
            if bool(ok):
                return True
            for tensor, copy_ in zip(tensors, self.copies, strict=True):
                tensor.copy_(copy_)
            return False
        for tensor, copy_ in zip(tensors, self.copies, strict=True):
            tensor.copy_(torch.where(ok, tensor, copy_))
        return ok


__all__ = ["LastGood", "SourceSnapshot", "all_finite", "bn_buffers", "momentum_buffers", "prime_momentum"]
