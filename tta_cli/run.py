"""``tta adapt`` as a library call: model, stream, method, engine and sinks wired together."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli.config import AdaptConfig, default_workers
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods.base import TTAMethod
from tta_cli.models import LoadedModel, export_model
from tta_cli.monitor import CollapseStop, monitor_for, source_reference_for
from tta_cli.outputs import Totals
from tta_cli.runtime import (
    RunSetup,
    SpeedOptions,
    check_precision,
    method_name,
    prepare_out_dir,
    refuse_non_empty,
    start_run,
    versions,
)
from tta_cli.sinks.export_folder import EXPORT_MODES, ExportFolder
from tta_cli.sinks.model_export import EXPORT_BN_CHOICES, LastInputs, agreement, exported_state, track_stream_statistics
from tta_cli.sinks.predictions import PREDICTION_FORMATS, ErrorsWriter, PredictionsWriter
from tta_cli.sinks.progress import ProgressDisplay, summary_table
from tta_cli.sources import Stream, VideoOptions, collect_stream
from tta_cli.sources.folder import folder_items
from tta_cli.sources.paths import check_input


def stream_items(config: AdaptConfig, class_names: list[str], transform: Any = None,
                 workers: int = 0) -> Stream:
    """The run's inputs as one stream, every input checked (and videos probed) before any output."""
    video = VideoOptions(config.every, config.fps, config.start, config.end, config.max_frames)
    return collect_stream(config.inputs, class_names, config.labels, video, config.shuffle, config.seed,
                          transform, workers, config.labels_encoding, config.labels_from_folders)


def adapt(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one adaptation over the stream; write predictions, the adapted model and run.json."""
    console = console or Console(stderr=True)
    if config.batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    check_precision(config.precision)
    out = config.out_dir()
    refuse_non_empty(out, config.overwrite)
    VideoOptions(config.every, config.fps, config.start, config.end, config.max_frames).validate()
    check_output_options(config)
    for path in config.inputs:  # a mistyped path fails now, not after loading the model
        check_input(path)
    speed = SpeedOptions(config.precision, config.channels_last, config.compile)
    setup = start_run(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                      num_classes=config.num_classes, device=config.device, seed=config.seed, speed=speed)
    workers = default_workers() if config.workers is None else config.workers
    stream = stream_items(config, setup.loaded.class_names, setup.transform, workers)
    try:
        return _adapt_stream(config, setup, stream, workers, out, console)
    finally:
        stream.close()


def check_output_options(config: AdaptConfig) -> None:
    """The output choices, before the model loads (a library call has no click to check them)."""
    choices = {"format": (config.format, PREDICTION_FORMATS), "export_mode": (config.export_mode, EXPORT_MODES),
               "export_bn": (config.export_bn, EXPORT_BN_CHOICES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise TTAError(f"unknown --{name.replace('_', '-')} {value!r}", f"choose from {', '.join(allowed)}")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise TTAError(f"--min-confidence must be between 0 and 1, got {config.min_confidence}")
    if config.export_folder is not None:
        refuse_non_empty(config.export_folder, config.overwrite,
                         hint="choose another --export-folder or pass --overwrite")


def predict(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """``tta predict``: the adapt flow with the ``source`` method (eval mode, no update) and no
    model export; the same inputs, labels, bad-file handling, predictions, errors.csv and run.json."""
    return adapt(replace(config, method="source", hyperparameters={}, clean=None, predict_only=True), console)


def _build_method(config: AdaptConfig, setup: RunSetup, console: Console) -> TTAMethod:
    name = method_name(config.method, config.clean is not None, console)
    fishers = None
    if name == "eata" and config.clean is not None:
        clean = folder_items(config.clean, setup.loaded.class_names)
        fishers, n = setup.fisher_information(clean, config.batch_size, config.hyperparameters)
        if not config.quiet:
            console.print(f"Fisher information from {n} clean images in {config.clean}")
    return setup.build_method(name, config.hyperparameters, config.batch_size, fishers)


def _adapt_stream(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int, out: Path,
                  console: Console) -> dict[str, Any]:
    loaded, device = setup.loaded, setup.device
    reference = source_reference_for(config.method, config.source_reference, loaded.model)  # before the method
    method = _build_method(config, setup, console)
    monitor = monitor_for(method, loaded.num_classes, reference, config.on_collapse, config.batch_size)
    prepare_out_dir(out, config.overwrite)
    if not config.quiet:
        _print_plan(console, loaded, method, stream.describe(), device)

    if not config.predict_only and config.export_bn == "stream":
        track_stream_statistics(method, config.batch_size)
    predictions = PredictionsWriter(out / f"predictions.{config.format}", loaded.class_names, config.format,
                                   monitor)
    errors = ErrorsWriter(out / "errors.csv")
    export = _export_folder(config, loaded)
    last = LastInputs()
    started = time.perf_counter()
    status = "completed"
    stopped: CollapseStop | None = None
    totals = Totals()
    progress = ProgressDisplay(console, stream.total, method, quiet=config.quiet, monitor=monitor)  # type: ignore[arg-type]
    method.reseed(config.seed)  # the method's own generator, seeded just before the first batch
    try:
        batches = setup.batches(stream, config.batch_size, workers, max_pixels=config.max_pixels)
        with progress:
            sinks = [monitor, predictions, errors, *([export] if export else []),
                     *([] if config.predict_only else [last]), progress]
            totals = run_stream(method, batches, device, sinks, tune_threads=setup.tune_threads)
    except KeyboardInterrupt:
        status = "interrupted"
        totals = progress.totals
    except CollapseStop as stop:
        status, totals, stopped = "collapsed", progress.totals, stop
    finally:
        predictions.close()
        errors.close()
        if export is not None:
            export.close()
    elapsed = time.perf_counter() - started
    n_items = totals.images + totals.skipped
    record = _record(config, loaded, method, totals, device, out, status, elapsed, n_items)
    record |= {"collapse_events": monitor.record(), "health": monitor.health()}
    if not config.predict_only:
        record["model_export"] = _export_run_model(config, loaded, method, out, last, device)
    if export is not None:
        record["export_folder"] = _export_record(export)
    (out / "run.json").write_text(json.dumps(record, indent=2))
    method.close()
    if not config.quiet:
        console.print(summary_table(record))
    if export is not None and export.failed:
        console.print(f"[yellow]warning: {len(export.failed)} images could not be exported to "
                      f"{export.directory} (listed in run.json)[/yellow]")
    if stopped is not None:
        raise stopped
    if status == "interrupted":
        raise TTAError("interrupted: the predictions so far, the model and run.json are in " + str(out),
                       exit_code=130)
    if totals.skipped:
        console.print(f"[yellow]warning: {totals.skipped} inputs could not be read, see {out / 'errors.csv'}"
                      "[/yellow]")
        if not totals.images:
            raise TTAError(f"none of the inputs could be read ({totals.skipped} skipped)",
                           f"see {out / 'errors.csv'}", exit_code=3)
        if config.strict:
            raise TTAError(f"{totals.skipped} inputs could not be read (--strict)", exit_code=3)
    return record


def _export_folder(config: AdaptConfig, loaded: LoadedModel) -> ExportFolder | None:
    if config.export_folder is None:
        return None
    return ExportFolder(config.export_folder, loaded.class_names, config.export_mode, config.min_confidence,
                        overwrite=config.overwrite)


def _export_record(export: ExportFolder) -> dict[str, Any]:
    return {"directory": str(export.directory), "mode": export.mode, "min_confidence": export.min_confidence,
            "files": export.stats.files, "uncertain": export.stats.uncertain,
            "copied_instead_of_linked": export.stats.copied_instead_of_linked,
            "failed": [{"path": key, "reason": reason} for key, reason in export.failed]}


def _export_run_model(config: AdaptConfig, loaded: LoadedModel, method: TTAMethod, out: Path,
                      last: LastInputs, device: torch.device) -> dict[str, Any]:
    """Write ``model/`` (and a method's further exports); how it agrees with the late predictions."""
    state, bn_statistics = exported_state(method, config.export_bn)
    export_model(loaded, state, out / "model")
    _write_extra_exports(method, out)
    return {"bn_statistics": bn_statistics, "agreement": agreement(out / "model", last, device)}


def _write_extra_exports(method: TTAMethod, out: Path) -> None:
    """Further state dicts a method exports (e.g. a teacher-student method's student)."""
    from safetensors.torch import save_file

    for filename, state in method.extra_exports().items():
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / filename))


def _print_plan(console: Console, loaded: LoadedModel, method: TTAMethod, stream: str,
                device: torch.device) -> None:
    info = method.describe()
    console.print(f"[bold]model[/bold] {loaded.spec} -> {loaded.architecture}"
                  f"{'.' + loaded.tag if loaded.tag else ''} ({loaded.source}), {loaded.num_classes} classes")
    dc = loaded.data_config
    console.print(f"[bold]preprocessing[/bold] input {tuple(dc['input_size'])}, {dc['interpolation']}, "
                  f"crop_pct {dc['crop_pct']}, mean {tuple(round(m, 4) for m in dc['mean'])}, "
                  f"std {tuple(round(s, 4) for s in dc['std'])}")
    line = f"[bold]method[/bold] {info['method']}"
    if info["lr"] is not None:
        line += f", lr {info['lr']:.4g} ({info['lr_source']}), {info['adapted_parameters']} parameter tensors"
    if info["bn_stats"]:
        line += f", BatchNorm statistics: {info['bn_stats']}"
    console.print(line)
    if info.get("choice"):
        console.print(f"[bold]auto chose[/bold] {info['choice']['method']}: {info['choice']['why']}", markup=True)
    console.print(f"[bold]stream[/bold] {stream} on {device}")


def _record(config: AdaptConfig, loaded: LoadedModel, method: TTAMethod, totals: Totals,
            device: torch.device, out: Path, status: str, elapsed: float, n_items: int) -> dict[str, Any]:
    info = method.describe()
    return {
        "status": status,
        "config": config.to_record(),
        "versions": versions(),
        "device": str(device),
        "model": loaded.describe(),
        "preprocessing": loaded.data_config,
        "method": info,
        "method_state": method.stats(),
        "counts": {
            "stream_items": n_items,
            "images": totals.images,
            "skipped": totals.skipped,
            "batches": totals.batches,
            "used_for_update": totals.used,
            "used_share": totals.used_share,
            "after_each_filter": totals.filter_counts,
            "resets": totals.resets,
            "mean_entropy": totals.mean_entropy,
            "labelled": totals.labelled,
            "correct": totals.correct,
        },
        "resets_at_batch": list(method.resets),
        "accuracy": totals.accuracy,
        "timing": {
            "seconds": elapsed,
            "adapt_seconds": totals.adapt_seconds,
            "images_per_second": totals.images / elapsed if elapsed > 0 else 0.0,
            "data_wait_seconds": totals.data_wait_seconds,
            "batches_waiting_for_data": totals.data_waits,
            "cpu_threads_from_batch": totals.cpu_threads,
            "device_idle_share": totals.device_idle_share,
        },
        "out": str(out),
    }
