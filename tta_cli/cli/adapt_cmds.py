"""``tta adapt``, ``tta methods`` and ``tta models``: each validates its flags and calls the library
(imported inside the command, so that ``tta --help`` never imports torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tta_cli.cli.options import (
    BatchSizeOpt,
    ChannelsLastOpt,
    CheckpointOpt,
    CompileOpt,
    DeviceOpt,
    EndOpt,
    EveryOpt,
    FpsOpt,
    JsonOpt,
    LabelsEncodingOpt,
    LabelsFromFoldersOpt,
    LrOpt,
    MaxFramesOpt,
    MaxPixelsOpt,
    MethodOpt,
    ModelOpt,
    NumClassesOpt,
    OutOpt,
    OverwriteOpt,
    PrecisionOpt,
    PretrainedOpt,
    QuietOpt,
    SeedOpt,
    ShuffleOpt,
    StartOpt,
    WorkersOpt,
)
from tta_cli.errors import TTAError


def parse_hyperparameters(pairs: list[str]) -> dict[str, str]:
    """``--set key=value`` pairs; values stay strings until the method's dataclass parses them."""
    hyperparameters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise TTAError(f"--set expects key=value, got {pair!r}")
        hyperparameters[key.strip()] = value.strip()
    return hyperparameters


def adapt(
    inputs: Annotated[list[Path], typer.Argument(
        help="Image folders, images, videos (.mp4 .mkv .avi .mov .webm) or .txt/.csv lists, in order.")],
    model: ModelOpt,
    method: MethodOpt = "sar",
    pretrained: PretrainedOpt = True,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="CSV with columns file,label (class name or index) for a flat folder.")] = None,
    labels_encoding: LabelsEncodingOpt = "utf-8",
    labels_from_folders: LabelsFromFoldersOpt = "auto",
    clean: Annotated[Path | None, typer.Option(
        "--clean", help="Folder of in-distribution images for EATA's Fisher regulariser.")] = None,
    batch_size: BatchSizeOpt = 64,
    lr: LrOpt = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Adaptation steps per batch.")] = None,
    episodic: Annotated[bool, typer.Option("--episodic", help="Reset to the source model every batch.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Method hyperparameter key=value (repeatable; see `tta methods`).")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    compile_model: CompileOpt = False,
    channels_last: ChannelsLastOpt = "auto",
    seed: SeedOpt = 0,
    shuffle: ShuffleOpt = False,
    every: EveryOpt = None,
    fps: FpsOpt = None,
    start: StartOpt = 0.0,
    end: EndOpt = None,
    max_frames: MaxFramesOpt = None,
    max_pixels: MaxPixelsOpt = 89_478_485,
    workers: WorkersOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero if any input was skipped.")] = False,
    quiet: QuietOpt = False,
    per_input: Annotated[bool, typer.Option(
        "--per-input", help="Adapt a separate model on each input, from the source model, into "
                            "OUT/<input name>/ (under torchrun, the inputs are dealt over the ranks).")] = False,
) -> None:
    """Adapt MODEL on the images in INPUTS; write predictions.csv, model/ and run.json to --out.

    Under ``torchrun --nproc-per-node N --no-python tta adapt ...`` the N processes adapt one model
    data-parallel (the batch size stays the global batch; docs/DISTRIBUTED.md)."""
    from tta_cli.config import AdaptConfig
    from tta_cli.run import adapt as run_adapt

    hyperparameters: dict[str, object] = parse_hyperparameters(set_ or [])
    if lr is not None:
        hyperparameters["lr"] = lr
    if steps is not None:
        hyperparameters["steps"] = steps
    if episodic:
        hyperparameters["episodic"] = True
    config = AdaptConfig(
        inputs=inputs, model=model, method=method, pretrained=pretrained, checkpoint=checkpoint,
        num_classes=num_classes, labels=labels, labels_encoding=labels_encoding,
        labels_from_folders=labels_from_folders, clean=clean, batch_size=batch_size, device=device,
        seed=seed, workers=workers, out=out, overwrite=overwrite, hyperparameters=hyperparameters, quiet=quiet,
        strict=strict, shuffle=shuffle, every=every, fps=fps, start=start, end=end, max_frames=max_frames,
        max_pixels=max_pixels, precision=precision, compile=compile_model, channels_last=channels_last,
    )
    if per_input:
        from tta_cli.per_input import adapt_each

        adapt_each(config)
        return
    run_adapt(config)


def methods(as_json: JsonOpt = False) -> None:
    """List the adaptation methods and their hyperparameters (for --set)."""
    import dataclasses

    from tta_cli.methods import get_method_class, list_methods

    listing = {}
    for name in list_methods():
        cls = get_method_class(name)
        doc = ((cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__) or "").strip()
        listing[name] = {
            "summary": doc.splitlines()[0] if doc else "",
            "hyperparameters": {f.name: f.default for f in dataclasses.fields(cls.config_class)},
        }
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("method", "what", "hyperparameters (--set key=value)")
    for name, entry in listing.items():
        hyperparameters = ", ".join(f"{k}={v}" for k, v in entry["hyperparameters"].items())
        table.add_row(name, entry["summary"], hyperparameters)
    Console().print(table)


def models(as_json: JsonOpt = False) -> None:
    """List the model aliases (the SAR paper's models)."""
    from tta_cli.models import ALIASES

    if as_json:
        typer.echo(json.dumps(ALIASES, indent=2))
        return
    for alias, name in ALIASES.items():
        typer.echo(f"{alias:12s} {name}")
