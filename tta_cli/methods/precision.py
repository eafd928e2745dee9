"""How a method runs, never what it computes: precision, memory format, compilation.

Chosen once per run (``TTAMethod.configure_performance``) and recorded in ``describe``. Forwards run
under autocast; the logits and every loss are taken in fp32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
"""bf16 where the hardware runs it natively and where it was measured to keep results, else fp32."""


@dataclass
class Performance:
    """How a method runs, not what it computes: chosen per run and recorded by ``describe``."""

    precision: str = "fp32"
    """fp32, or autocast to bf16 / fp16 (fp16 with dynamic loss scaling); losses stay in fp32."""
    channels_last: bool = False
    """Model and inputs in channels-last memory format (faster convolutions)."""
    compile: bool | str = False
    """torch.compile the model in place (a string names the backend)."""
    requested: str = ""
    """What the run asked for (``auto`` or a precision); empty when set directly."""
    reason: str = ""
    """Why ``auto`` chose ``precision`` (recorded in run.json)."""


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


# --- --precision auto --------------------------------------------------------------------------

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 arithmetic units (AMX tiles, AVX512-BF16 dot products);
elsewhere torch emulates bf16 with conversions and it runs slower than fp32."""

BF16_FALLBACKS: dict[tuple[str, str], str] = {}
"""(norm family, method) -> why bf16 is not used: the combinations where bf16 autocast changed
accuracy by more than 0.3 points or collapsed on the fidelity stream (benchmarks/precision.py,
docs/PERFORMANCE.md). ``*`` matches any method. Filled from measurements only."""

MIN_BF16_CPU_PIXELS = 96 * 96
"""On the CPU, inputs below this many pixels stay in fp32: on 32 px CIFAR models bf16 ran slower
than fp32 even with AMX (per-layer conversions outweigh tiny matrix products, docs/PERFORMANCE.md)."""


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The bf16 flags this CPU reports (Linux); torch's capability string as a fallback elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if not found and not text:
        capability = str(torch.backends.cpu.get_cpu_capability())
        found = [capability] if "AMX" in capability or "BF16" in capability else []
    return found


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and what says so."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA {torch.cuda.get_device_name(device)}: bf16 {'supported' if ok else 'not supported'}"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        return bool(flags), f"CPU bf16 units: {', '.join(flags)}" if flags else "CPU without AMX-BF16/AVX512-BF16"
    return False, f"{device.type}: bf16 autocast not measured"


def resolve_precision(requested: str, device: torch.device, family: str, method: str,
                      input_pixels: int) -> tuple[str, str]:
    """The precision a run uses and why: ``auto`` is bf16 on hardware with bf16 units, unless the
    model's norm family and method are in ``BF16_FALLBACKS`` or the inputs are tiny on a CPU."""
    if requested != AUTO:
        check_precision(requested)
        return requested, "requested"
    native, why = native_bf16(device)
    if not native:
        return "fp32", why
    fallback = BF16_FALLBACKS.get((family, method)) or BF16_FALLBACKS.get((family, "*"))
    if fallback:
        return "fp32", f"{why}; {fallback}"
    if device.type == "cpu" and input_pixels < MIN_BF16_CPU_PIXELS:
        return "fp32", f"{why}; inputs of {input_pixels} pixels run faster in fp32 on the CPU"
    return "bf16", why


__all__ = ["AUTO", "BF16_FALLBACKS", "PRECISIONS", "Performance", "apply_to_model", "autocast", "check_precision",
           "has_scaled", "loss_scaler", "native_bf16", "prepare_input", "resolve_precision"]
