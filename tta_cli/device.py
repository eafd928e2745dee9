"""Device policy: which device a run uses and how its backends and memory format are set."""

from __future__ import annotations

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods.base import is_vit_like


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise TTAError(f"invalid device {requested!r}", "use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TTAError("CUDA is not available on this machine", "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TTAError(f"no CUDA device {device.index}", f"{torch.cuda.device_count()} available")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TTAError("MPS is not available on this machine", "use --device cpu or auto")
    return device


def configure_backends(device: torch.device) -> None:
    """cuDNN autotuning: the stream's shapes repeat, so the fastest algorithms are found once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_channels_last(requested: str, model: nn.Module, device: torch.device) -> bool:
    """``auto``: convolutional networks on CUDA (tensor-core convolutions want NHWC); on the CPU
    it measured no faster (docs/PERFORMANCE.md) and transformers have a single convolution."""
    if requested in ("on", "off"):
        return requested == "on"
    if requested != "auto":
        raise TTAError(f"--channels-last must be auto, on or off, got {requested!r}")
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return device.type == "cuda" and has_conv and not is_vit_like(model)
