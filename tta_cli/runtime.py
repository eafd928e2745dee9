"""How a run is set up, the same for ``tta adapt`` and for every run of ``tta bench``.

Seeds, device and backends, CPU threads, the model, the method with its speed options and what it
learns from clean images before the stream (EATA's Fisher information), the versions record and the
output folder: one implementation, so that the same model, stream and method give the same
predictions through either command.
"""

from __future__ import annotations

import copy
import os
import platform
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli import __version__
from tta_cli.device import configure_backends, resolve_channels_last, resolve_device
from tta_cli.errors import TTAError
from tta_cli.methods import create_method, get_method_class, method_config
from tta_cli.methods.base import PRECISIONS, TTAMethod
from tta_cli.methods.precision import AUTO, resolve_precision
from tta_cli.methods.selection import norm_family
from tta_cli.models import LoadedModel, load_model
from tta_cli.ownership import plan_overwrite, remove_planned, start_manifest
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.loader import iter_batches

Prepared = dict[str, Any]
"""What a method learnt from clean images before the stream (``TTAMethod.preparation``; EATA: its
Fisher information, parameter name -> (diagonal Fisher, source value))."""
Fishers = Prepared


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (numpy is optional for the core)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed)


def versions() -> dict[str, str]:
    import timm

    return {"tta": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def check_precision(precision: str) -> None:
    if precision != AUTO and precision not in PRECISIONS:
        raise TTAError(f"unknown precision {precision!r}", f"choose from {AUTO}, {', '.join(PRECISIONS)}")


def cpu_threads(threads: int | None) -> bool:
    """Set torch's CPU thread count when given; True when the engine should choose it by timing
    steps instead (neither ``threads`` nor ``OMP_NUM_THREADS`` pins it)."""
    if threads:
        torch.set_num_threads(threads)
        return False
    return "OMP_NUM_THREADS" not in os.environ


# --- the output folder -----------------------------------------------------------------------------

OVERWRITE_HINT = "choose another --out or pass --overwrite"

RUN_OUTPUTS = ("predictions.csv", "predictions.jsonl", "errors.csv", "run.json", "model", "student.safetensors",
               "checkpoint.pt", "report")
"""What a run (and ``tta report``) writes in its folder: listed in the folder's manifest as they are
written (:mod:`tta_cli.ownership`), so that ``--overwrite`` removes them and nothing else."""


def refuse_non_empty(out: Path, overwrite: bool, ignore: Sequence[str] = (), hint: str = OVERWRITE_HINT) -> None:
    """A folder with files (other than ``ignore``) is refused unless ``overwrite``, and then also
    when it holds a run's output name that no tta run recorded writing there (checks only)."""
    plan_overwrite(out, overwrite, RUN_OUTPUTS, ignore, hint=hint)


def prepare_out_dir(out: Path, overwrite: bool, ignore: Sequence[str] = (), hint: str = OVERWRITE_HINT) -> None:
    """Check the folder as :func:`refuse_non_empty`, then (``overwrite``) remove what an earlier run
    recorded writing there, start the manifest and check the folder can be written."""
    planned = plan_overwrite(out, overwrite, RUN_OUTPUTS, ignore, hint=hint)
    try:
        out.mkdir(parents=True, exist_ok=True)
        start_manifest(out)
        remove_planned(out, planned)
        probe = out / ".tta-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TTAError(f"cannot write to output folder {out}: {err.strerror}",
                       "choose another --out") from err


# --- the model and the method ----------------------------------------------------------------------

def method_name(name: str, has_clean: bool, console: Console | None = None) -> str:
    """The method that runs: one that learns from clean images (``TTAMethod.clean_data``) runs, and
    is reported, as its ``without_clean_data`` method when given none (EATA: ETA)."""
    name = name.strip().lower()
    cls = get_method_class(name)
    if cls.clean_data and cls.without_clean_data and not has_clean:
        if console is not None:
            console.print(f"[yellow]{name} without --clean: no {cls.clean_data.removeprefix('the ')}, "
                          f"running {cls.without_clean_data}[/yellow]")
        return cls.without_clean_data
    return name


def uses_clean_data(name: str) -> bool:
    """The method learns from clean images before the stream (``RunSetup.prepare``)."""
    return bool(get_method_class(name).clean_data)


@dataclass(frozen=True)
class SpeedOptions:
    """How methods run, never what they compute (docs/PERFORMANCE.md)."""

    precision: str = AUTO
    """auto (bf16 where measured to pay and to keep results, else fp32), fp32, bf16 or fp16."""
    channels_last: str = "auto"
    """auto (conv nets on CUDA), on or off."""
    compile: bool = False


@dataclass
class RunSetup:
    """What the runs on one model share: the source model, its transform, the device, the speed
    options and the CPU thread policy."""

    loaded: LoadedModel
    device: torch.device
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    tune_threads: bool = False
    """Let the engine choose the CPU thread count (see ``tta_cli.threads``)."""
    transform: Callable[[Any], torch.Tensor] = field(init=False)

    def __post_init__(self) -> None:
        self.transform = self.loaded.transform()

    def batches(self, items: Any, batch_size: int, workers: int = 0, **options: Any) -> Iterator[Batch]:
        """The items (a list or a ``Stream``) decoded into batches with the model's transform."""
        return iter_batches(items, self.transform, batch_size, workers,
                            pin_memory=self.device.type == "cuda", **options)

    def prepare(self, name: str, clean: Sequence[StreamItem], batch_size: int,
                hyperparameters: Mapping[str, Any] | None = None) -> tuple[Prepared, int]:
        """What the method learns from the ``clean`` images (``TTAMethod.prepare``) and the number of
        images used, on a copy of the source model: the model that adapts never sees them."""
        model = copy.deepcopy(self.loaded.model).to(self.device)
        probe = create_method(name, model, method_config(name, **(hyperparameters or {})), batch_size=batch_size)
        batches = iter_batches(list(clean), self.transform, batch_size, workers=0)
        n = probe.prepare(b.images.to(self.device) for b in batches if b.items)
        prepared = probe.preparation()
        probe.close()
        return prepared, n

    def build_method(self, name: str, hyperparameters: Mapping[str, Any] | None = None, batch_size: int = 64,
                     prepared: Prepared | None = None, fresh_copy: bool = False) -> TTAMethod:
        """The method on the device with the speed options and what ``prepare`` learnt (copied);
        ``fresh_copy`` wraps a copy of the source model (one run of many), else the loaded model
        itself (one run)."""
        model = copy.deepcopy(self.loaded.model) if fresh_copy else self.loaded.model
        model.to(self.device)
        method = create_method(name, model, method_config(name, **(hyperparameters or {})), batch_size=batch_size)
        configure_backends(self.device)
        channels_last = resolve_channels_last(self.speed.channels_last, model, self.device)
        pixels = int(self.loaded.data_config["input_size"][-1] * self.loaded.data_config["input_size"][-2])
        precision, reason = resolve_precision(self.speed.precision, self.device, norm_family(model), name, pixels)
        method.configure_performance(precision, channels_last, self.speed.compile)
        method.performance.requested, method.performance.reason = self.speed.precision, reason
        if prepared:
            method.use_preparation(prepared)
        return method


def start_run(model: str, *, pretrained: bool = True, checkpoint: Path | None = None,
              num_classes: int | None = None, device: str = "auto", seed: int = 0, threads: int | None = None,
              speed: SpeedOptions | None = None) -> RunSetup:
    """Check the options, pick the device and threads, seed, and load the model."""
    speed = speed or SpeedOptions()
    check_precision(speed.precision)
    resolved = resolve_device(device)
    tune = cpu_threads(threads)
    seed_everything(seed)
    loaded = load_model(model, pretrained, checkpoint, num_classes)
    return RunSetup(loaded, resolved, speed, tune)
