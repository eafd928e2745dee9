"""``tta adapt``, ``tta methods`` and ``tta models``: each validates its flags and calls the library
(imported inside the command, so that ``tta --help`` never imports torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tta_cli.choices import ON_COLLAPSE, SOURCE_REFERENCE
from tta_cli.cli.options import (
    METHOD,
    RUN,
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
    one_of,
    whole,
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
        metavar="INPUTS", show_default=False,
        help="Image folders, images, videos (.mp4 .mkv .avi .mov .webm) or .txt/.csv lists, in order.",
    )] = None,
    model: ModelOpt = "",
    pretrained: PretrainedOpt = True,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    labels: LabelsOpt = None,
    labels_encoding: LabelsEncodingOpt = "utf-8",
    labels_from_folders: LabelsFromFoldersOpt = "auto",
    shuffle: ShuffleOpt = False,
    every: EveryOpt = None,
    fps: FpsOpt = None,
    start: StartOpt = 0.0,
    end: EndOpt = None,
    max_frames: MaxFramesOpt = None,
    max_pixels: MaxPixelsOpt = 89_478_485,
    strict: StrictOpt = False,
    method: MethodOpt = "auto",
    lr: LrOpt = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", metavar="N", rich_help_panel=METHOD, callback=whole(1),
        help="Adaptation steps per batch.")] = None,
    episodic: Annotated[bool, typer.Option(
        "--episodic", rich_help_panel=METHOD, help="Reset to the source model after every batch.")] = False,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", rich_help_panel=METHOD, show_default=False,
        help="A method hyperparameter (repeatable; tta methods lists them).")] = None,
    clean: Annotated[Path | None, typer.Option(
        "--clean", metavar="DIR", rich_help_panel=METHOD,
        help="In-distribution images for EATA's Fisher regulariser.")] = None,
    on_collapse: Annotated[str, typer.Option(
        "--on-collapse", metavar="ACTION", rich_help_panel=METHOD, callback=one_of(*ON_COLLAPSE),
        help="When predictions collapse (no labels needed): reset the model, stop (exit 4) or warn.",
    )] = "reset",
    source_reference: Annotated[str, typer.Option(
        "--source-reference", metavar="MODE", rich_help_panel=METHOD, callback=one_of(*SOURCE_REFERENCE),
        help="Which images a frozen source copy also predicts, for the collapse signals, the verdict and "
             "the source_pred column: sampled (the first 512 images, then 1 batch in 4), all, or off (no verdict).",
    )] = "sampled",
    no_source_reference: Annotated[bool, typer.Option("--no-source-reference", hidden=True,
                                                      help="Same as --source-reference off.")] = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    output_format: FormatOpt = "csv",
    export_folder: ExportFolderOpt = None,
    export_mode: ExportModeOpt = "hardlink",
    min_confidence: MinConfidenceOpt = None,
    export_bn: ExportBnOpt = "stream",
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    compile_model: CompileOpt = False,
    channels_last: ChannelsLastOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", metavar="N", rich_help_panel=RUN, callback=whole(0),
        help="Batches between resume checkpoints in --out (0: none).")] = 50,
    resume: Annotated[Path | None, typer.Option(
        "--resume", metavar="DIR", rich_help_panel=RUN,
        help="Continue the stopped run in DIR with the options it recorded.")] = None,
    per_input: Annotated[bool, typer.Option(
        "--per-input", rich_help_panel=RUN,
        help="Adapt one model per input, from the source model, into OUT/<input name>/.")] = False,
) -> None:
    """Adapt a model to the images it predicts on; write the predictions, the adapted model and
    run.json.

    Reads INPUTS as one ordered stream, predicts each batch, then adapts on it (--method, default
    auto). Ends with a summary: accuracy before and after where labels are given, and a verdict
    that needs no labels. Under torchrun the processes adapt one model data-parallel
    (docs/DISTRIBUTED.md).
    """
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
        on_collapse=on_collapse, source_reference="off" if no_source_reference else source_reference,
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
    shuffle: ShuffleOpt = False,
    every: EveryOpt = None,
    fps: FpsOpt = None,
    start: StartOpt = 0.0,
    end: EndOpt = None,
    max_frames: MaxFramesOpt = None,
    max_pixels: MaxPixelsOpt = 89_478_485,
    strict: StrictOpt = False,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    output_format: FormatOpt = "csv",
    export_folder: ExportFolderOpt = None,
    export_mode: ExportModeOpt = "hardlink",
    min_confidence: MinConfidenceOpt = None,
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
    batch_size: BatchSizeOpt = 64,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    compile_model: CompileOpt = False,
    channels_last: ChannelsLastOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
) -> None:
    """Predict with a model as it is, without adapting; write the predictions and run.json.

    Any --model that adapt takes, e.g. the model/ folder a tta adapt run exported.
    """
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
    from tta_cli.methods._registry import DEFAULT_METHOD, method_summary
    from tta_cli.methods.hyperparameters import accepts, choices

    listing = {}
    for name in list_methods():
        cls = get_method_class(name)
        fields = [f.name for f in dataclasses.fields(cls.config_class)]
        listing[name] = {
            "summary": method_summary(cls),
            "default": name == DEFAULT_METHOD,
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

    table = Table("method", "what it does", "hyperparameters (--set key=value; choices in parentheses)")
    for name, entry in listing.items():
        hyperparameters = ", ".join(
            f"{k}={v}" + (f" ({'|'.join(map(str, entry['choices'][k]))})" if k in entry["choices"] else "")
            for k, v in entry["hyperparameters"].items())
        table.add_row(name + (" (default)" if entry["default"] else ""), escape(entry["summary"]),
                      escape(hyperparameters))
    Console().print(table)


def models(as_json: JsonOpt = False) -> None:
    """List the model aliases (the SAR paper's models)."""
    from tta_cli.models import ALIASES

    if as_json:
        print_summary(dict(ALIASES), True)
        return
    for alias, name in ALIASES.items():
        typer.echo(f"{alias:12s} {name}")
