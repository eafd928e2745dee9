"""``tta adapt`` as a library call: model, stream, method, engine and sinks wired together."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli import distributed
from tta_cli.config import AdaptConfig, default_workers
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods.base import TTAMethod
from tta_cli.models import LoadedModel, export_model
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
from tta_cli.sinks.predictions import ErrorsWriter, PredictionsWriter
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
    """Run one adaptation over the stream; write predictions, the adapted model and run.json.

    Launched by ``torchrun`` with several ranks, the ranks adapt one model data-parallel and rank 0
    writes the outputs (``tta_cli.distributed``, docs/DISTRIBUTED.md)."""
    device = distributed.start(config.device)
    if distributed.active():
        config = replace(config, device=device, quiet=config.quiet or not distributed.is_main())
    try:
        return adapt_local(config, console)
    finally:
        distributed.stop()


def adapt_local(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """``adapt`` without joining a process group (data-parallel only if one is running already)."""
    console = console or Console(stderr=True)
    if config.batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    check_precision(config.precision)
    out = config.out_dir()
    refuse_non_empty(out, config.overwrite)
    VideoOptions(config.every, config.fps, config.start, config.end, config.max_frames).validate()
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
    distributed.check_world(config.batch_size, method_name(config.method, config.clean is not None),
                            bool(stream.videos))
    method = _build_method(config, setup, console)
    distributed.barrier()  # every rank has checked the output folder before rank 0 writes into it
    if not distributed.is_main():
        return _follow_stream(config, setup, stream, workers, method)
    prepare_out_dir(out, config.overwrite)
    if not config.quiet:
        _print_plan(console, loaded, method, stream.describe(), device)

    predictions = PredictionsWriter(out / "predictions.csv", loaded.class_names)
    errors = ErrorsWriter(out / "errors.csv")
    started = time.perf_counter()
    status = "completed"
    totals = Totals()
    progress = ProgressDisplay(console, stream.total, method, quiet=config.quiet)  # type: ignore[arg-type]
    method.reseed(config.seed)  # the method's own generator, seeded just before the first batch
    try:
        batches = _batches(config, setup, stream, workers)
        sinks = [predictions, errors, progress]
        gather = distributed.GatherToMain(sinks) if distributed.active() else None
        with progress, distributed.peer_failures():
            totals = run_stream(method, batches, device, [gather] if gather else sinks,
                                tune_threads=setup.tune_threads)
        if gather is not None:
            totals = distributed.merged_totals(totals, gather.totals)
    except KeyboardInterrupt:
        status = "interrupted"
        totals = progress.totals
    finally:
        predictions.close()
        errors.close()
    elapsed = time.perf_counter() - started
    export_model(loaded, method.adapted_state_dict(), out / "model")
    _write_extra_exports(method, out)
    n_items = totals.images + totals.skipped
    record = _record(config, loaded, method, totals, device, out, status, elapsed, n_items)
    (out / "run.json").write_text(json.dumps(record, indent=2))
    method.close()
    if not config.quiet:
        console.print(summary_table(record))
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


def _batches(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int) -> Any:
    """The stream's batches; data-parallel, this rank's rows of each, decoded here alone."""
    if not distributed.active():
        return setup.batches(stream, config.batch_size, workers, max_pixels=config.max_pixels)
    return distributed.rank_batches(stream, setup.transform, config.batch_size, setup.loaded.data_config["input_size"],
                                    workers, setup.device.type == "cuda", config.max_pixels)


def _follow_stream(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int,
                   method: TTAMethod) -> dict[str, Any]:
    """A rank other than 0: adapt on its rows, send its outputs to rank 0, write nothing."""
    method.reseed(config.seed)
    with distributed.peer_failures():
        run_stream(method, _batches(config, setup, stream, workers), setup.device,
                   [distributed.GatherToMain([])], tune_threads=setup.tune_threads)
    method.close()
    return {"status": "completed", "rank": distributed.rank(), "world_size": distributed.world_size()}


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
    console.print(f"[bold]stream[/bold] {stream} on {device}")


def _record(config: AdaptConfig, loaded: LoadedModel, method: TTAMethod, totals: Totals,
            device: torch.device, out: Path, status: str, elapsed: float, n_items: int) -> dict[str, Any]:
    info = method.describe()
    return {
        "status": status,
        "config": config.to_record(),
        "versions": versions(),
        "device": str(device),
        "world_size": distributed.world_size(),
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
