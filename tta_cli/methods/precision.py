"""How a method runs, never what it computes: precision, memory format, compilation.

Chosen once per run (``TTAMethod.configure_performance``) and recorded in ``describe``. Forwards run
under autocast; the logits and every loss are taken in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Performance:
    """How a method runs, not what it computes: chosen per run and recorded by ``describe``."""

    precision: str = "fp32"
    """fp32, or autocast to bf16 / fp16 (fp16 with dynamic loss scaling); losses stay in fp32."""
    channels_last: bool = False
    """Model and inputs in channels-last memory format (faster convolutions)."""
    compile: bool | str = False
    """torch.compile the model in place (a string names the backend)."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def loss_scaler(precision: str, device: torch.device, has_params: bool) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" and has_params else None


def has_scaled(scaler: torch.amp.GradScaler) -> bool:
    """Whether ``scaler`` has scaled a loss yet: before that its ``step`` has no scale to unscale
    with (torch raises), and the gradients present are unscaled."""
    return getattr(scaler, "_scale", None) is not None


def apply_to_model(model: nn.Module, performance: Performance) -> None:
    """Memory format and compilation, in place: parameters, names, hooks and state dict stay."""
    if performance.channels_last:
        model.to(memory_format=torch.channels_last)
    if performance.compile:
        compile_arg = performance.compile
        model.compile(**({"backend": compile_arg} if isinstance(compile_arg, str) else {}))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = ["PRECISIONS", "Performance", "apply_to_model", "autocast", "check_precision", "has_scaled", "loss_scaler",
           "prepare_input"]
