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
    ExportBnOpt,
    ExportFolderOpt,
    ExportModeOpt,
    FormatOpt,
    FpsOpt,
    InputsArg,
    JsonOpt,
    LabelsEncodingOpt,
    LabelsFromFoldersOpt,
    LabelsOpt,
    LrOpt,
    MaxFramesOpt,
    MaxPixelsOpt,
    MethodOpt,
    MinConfidenceOpt,
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
    StrictOpt,
    SummaryJsonOpt,
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
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="Image folders, images, videos (.mp4 .mkv .avi .mov .webm) or .txt/.csv lists, in order.",
        show_default=False)] = None,
    model: ModelOpt = "",
    method: MethodOpt = "auto",
    pretrained: PretrainedOpt = True,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    labels: LabelsOpt = None,
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
    precision: PrecisionOpt = "auto",
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
    output_format: FormatOpt = "csv",
    export_folder: ExportFolderOpt = None,
    export_mode: ExportModeOpt = "hardlink",
    min_confidence: MinConfidenceOpt = None,
    export_bn: ExportBnOpt = "stream",
    strict: StrictOpt = False,
    on_collapse: Annotated[str, typer.Option(
        "--on-collapse", help="reset, stop (exit 4) or warn when predictions collapse (no labels needed).")] = "reset",
    source_reference: Annotated[bool, typer.Option(
        "--source-reference/--no-source-reference",
        help="Run a frozen source copy per batch (collapse signals, health verdict, source_pred column).")] = True,
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", min=0, help="Batches between resume checkpoints in --out (0: none).")] = 50,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue the stopped run in this --out folder, with its recorded options.")] = None,
    per_input: Annotated[bool, typer.Option(
        "--per-input", help="Adapt a separate model on each input, from the source model, into "
                            "OUT/<input name>/ (under torchrun, the inputs are dealt over the ranks).")] = False,
) -> None:
    """Adapt MODEL on the images in INPUTS; write predictions, model/ and run.json to --out.

    Under ``torchrun --nproc-per-node N --no-python tta adapt ...`` the N processes adapt one model
    data-parallel (the batch size stays the global batch; docs/DISTRIBUTED.md)."""
    from tta_cli.config import AdaptConfig
    from tta_cli.run import adapt as run_adapt

    if resume is not None:
        from tta_cli.run import resume as run_resume

        if inputs or model:
            raise TTAError("--resume takes the inputs and options the run recorded",
                           f"run: tta adapt --resume {resume}")
        run_resume(resume)
        return
    if not inputs:
        raise TTAError("Missing argument 'INPUTS...'", "see 'tta adapt --help'")
    if not model:
        raise TTAError("Missing option '--model' / '-m'", "see 'tta adapt --help'")

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
        export_folder=export_folder, export_mode=export_mode, min_confidence=min_confidence,
        export_bn=export_bn, format=output_format,
        on_collapse=on_collapse, source_reference=source_reference,
        checkpoint_every=checkpoint_every,
    )
    if per_input:
        from tta_cli.per_input import adapt_each

        adapt_each(config)
        return
    print_summary(run_adapt(config), as_json)


def predict(
    inputs: InputsArg,
    model: ModelOpt,
    pretrained: PretrainedOpt = True,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    labels: LabelsOpt = None,
    labels_encoding: LabelsEncodingOpt = "utf-8",
    labels_from_folders: LabelsFromFoldersOpt = "auto",
    batch_size: BatchSizeOpt = 64,
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
    output_format: FormatOpt = "csv",
    export_folder: ExportFolderOpt = None,
    export_mode: ExportModeOpt = "hardlink",
    min_confidence: MinConfidenceOpt = None,
    strict: StrictOpt = False,
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
) -> None:
    """Predict with MODEL on the images in INPUTS, without adapting; write predictions and run.json to --out."""
    from tta_cli.config import AdaptConfig
    from tta_cli.run import predict as run_predict

    config = AdaptConfig(
        inputs=inputs, model=model, method="source", pretrained=pretrained, checkpoint=checkpoint,
        num_classes=num_classes, labels=labels, labels_encoding=labels_encoding,
        labels_from_folders=labels_from_folders, batch_size=batch_size, device=device, seed=seed,
        workers=workers, out=out, overwrite=overwrite, quiet=quiet, strict=strict, shuffle=shuffle,
        every=every, fps=fps, start=start, end=end, max_frames=max_frames, max_pixels=max_pixels,
        precision=precision, compile=compile_model, channels_last=channels_last,
        export_folder=export_folder, export_mode=export_mode, min_confidence=min_confidence,
        format=output_format,
    )
    print_summary(run_predict(config), as_json)


def print_summary(record: dict[str, object], as_json: bool) -> None:
    """``--json``: the command's final summary as one JSON object on stdout."""
    if as_json:
        typer.echo(json.dumps(record))


def methods(as_json: JsonOpt = False) -> None:
    """List the adaptation methods and their hyperparameters (for --set)."""
    import dataclasses

    from tta_cli.methods import get_method_class, list_methods
    from tta_cli.methods.hyperparameters import accepts, choices

    listing = {}
    for name in list_methods():
        cls = get_method_class(name)
        doc = ((cls.__module__ and __import__(cls.__module__, fromlist=["_"]).__doc__) or "").strip()
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        listing[name] = {
            "summary": doc.splitlines()[0] if doc else "",
            "hyperparameters": {f.name: f.default for f in dataclasses.fields(cls.config_class)},
            "choices": {k: list(c) for k in fields if (c := choices(cls.config_class, k)) is not None},
            "accepts": {k: accepts(cls.config_class, k) for k in fields},
        }
    if as_json:
        print_summary(listing, True)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("method", "what", "hyperparameters (--set key=value; choices in parentheses)")
    for name, entry in listing.items():
        hyperparameters = ", ".join(
            f"{k}={v}" + (f" ({'|'.join(map(str, entry['choices'][k]))})" if k in entry["choices"] else "")
            for k, v in entry["hyperparameters"].items())
        table.add_row(name, escape(entry["summary"]), escape(hyperparameters))
    Console().print(table)


def models(as_json: JsonOpt = False) -> None:
    """List the model aliases (the SAR paper's models)."""
    from tta_cli.models import ALIASES

    if as_json:
        print_summary(dict(ALIASES), True)
        return
    for alias, name in ALIASES.items():
        typer.echo(f"{alias:12s} {name}")
