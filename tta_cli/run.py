"""``tta adapt`` as a library call: model, stream, method, engine and sinks wired together."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli import __version__, distributed, signals
from tta_cli.atomic import atomic_write, refuse_symlink
from tta_cli.checkpoint import (
    CHECKPOINT,
    Checkpointer,
    ResumePoint,
    config_from_record,
    continued,
    resume_point,
    set_rng_states,
    skip_consumed,
    truncate_outputs,
)
from tta_cli.config import AdaptConfig, default_workers
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods import Method, get_method_class
from tta_cli.models import LoadedModel, export_model
from tta_cli.monitor import CollapseMonitor, CollapseStop, monitor_for, source_reference_for
from tta_cli.outcome import Outcome, after_signal, check_outcome, disk_full_as_error, failure_reason
from tta_cli.outputs import Totals
from tta_cli.ownership import start_manifest
from tta_cli.record import export_folder_record, run_record, write_record
from tta_cli.run_folders import RunFolders
from tta_cli.runtime import (
    RunSetup,
    SpeedOptions,
    check_precision,
    method_name,
    start_run,
    uses_clean_data,
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


def adapt(config: AdaptConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """Run one adaptation over the stream; write predictions, the adapted model and run.json.

    ``resume`` continues the run recorded in ``config.out`` from its checkpoint (see
    ``tta_cli.checkpoint``). SIGTERM is handled as Ctrl-C while the run is on.

    Launched by ``torchrun`` with several ranks, the ranks adapt one model data-parallel and rank 0
    writes the outputs (``tta_cli.distributed``, docs/DISTRIBUTED.md). The per-image sinks that need
    the images themselves (source reference, export folder, export check) and checkpoints are off
    there: rank 0 sees the gathered outputs, not every rank's images.
    """
    device = distributed.start(config.device)
    if distributed.active():
        if resume:
            raise TTAError("--resume is not supported under torchrun", "resume the run in one process")
        config = replace(config, device=device, quiet=config.quiet or not distributed.is_main(),
                         source_reference=False, checkpoint_every=0)
    try:
        return adapt_local(config, console, resume)
    finally:
        distributed.stop()


def adapt_local(config: AdaptConfig, console: Console | None = None, resume: bool = False) -> dict[str, Any]:
    """``adapt`` without joining a process group (data-parallel only if one is running already)."""
    console = console or Console(stderr=True)
    if config.batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    if config.checkpoint_every < 0:
        raise TTAError("--checkpoint-every must be 0 (no checkpoints) or more")
    check_precision(config.precision)
    out = config.out_dir()
    VideoOptions(config.every, config.fps, config.start, config.end, config.max_frames).validate()
    check_output_options(config)
    for path in config.inputs:  # a mistyped path fails now, not after loading the model
        check_input(path)
    speed = SpeedOptions(config.precision, config.channels_last, config.compile)
    with signals.policy(), RunFolders(out, config.export_folder, config.overwrite, resume,
                                      lock=distributed.is_main()) as folders:
        try:
            signals.test_point("load")
            setup = start_run(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                              num_classes=config.num_classes, device=config.device, seed=config.seed, speed=speed)
        except KeyboardInterrupt:
            _stopped_before_start(config, folders)
            raise
        try:
            workers = default_workers() if config.workers is None else config.workers
            stream = stream_items(config, setup.loaded.class_names, setup.transform, workers)
            try:
                return _adapt_stream(config, setup, stream, workers, folders, console, resume)
            finally:
                stream.close()  # removes a shuffled stream's temporary frames on every exit path
        except KeyboardInterrupt:
            _stopped_before_start(config, folders)
            raise


def _stopped_before_start(config: AdaptConfig, folders: RunFolders) -> None:
    """Interrupted while loading, before the first output: in a folder that was empty, run.json
    says so (interrupted, 0 images), and ``--resume`` starts the run from the beginning."""
    if not folders.fresh or folders.prepared or not distributed.is_main():
        return
    with signals.deferred(), contextlib.suppress(OSError):
        folders.out.mkdir(parents=True, exist_ok=True)
        start_manifest(folders.out)
        write_record(folders.out, {"status": "interrupted", "reason": signals.signal_name(),
                                    "config": config.to_record(), "counts": {"images": 0},
                                    "versions": {"tta": __version__}, "out": str(folders.out)})
    raise TTAError(f"interrupted ({signals.signal_name()}) before the first image; start it with: "
                   f"tta adapt --resume {folders.out}", exit_code=signals.exit_code())


def resume(out: Path, console: Console | None = None) -> dict[str, Any]:
    """``tta adapt --resume OUT``: continue the run in ``out`` with the configuration it recorded."""
    record_path = out / "run.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        config = config_from_record(record["config"], out)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TTAError(f"cannot resume from {out}: no readable run.json ({err})",
                       "pass the --out folder of a run started by tta adapt") from err
    if record.get("status") == "completed":
        raise TTAError(f"the run in {out} has completed: nothing to resume")
    return adapt(config, console, resume=True)


def check_output_options(config: AdaptConfig) -> None:
    """The output choices, before the model loads (a library call has no click to check them)."""
    choices = {"format": (config.format, PREDICTION_FORMATS), "export_mode": (config.export_mode, EXPORT_MODES),
               "export_bn": (config.export_bn, EXPORT_BN_CHOICES)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise TTAError(f"unknown --{name.replace('_', '-')} {value!r}", f"choose from {', '.join(allowed)}")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise TTAError(f"--min-confidence must be between 0 and 1, got {config.min_confidence}")


def predict(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """``tta predict``: the adapt flow with the ``source`` method (eval mode, no update) and no
    model export; the same inputs, labels, bad-file handling, predictions, errors.csv and run.json."""
    return adapt(replace(config, method="source", hyperparameters={}, clean=None, predict_only=True), console)


def _build_method(config: AdaptConfig, setup: RunSetup, console: Console) -> Method:
    name = method_name(config.method, config.clean is not None, console)
    prepared = None
    if config.clean is not None and uses_clean_data(name):
        clean = folder_items(config.clean, setup.loaded.class_names)
        prepared, n = setup.prepare(name, clean, config.batch_size, config.hyperparameters)
        if not config.quiet:
            console.print(f"{name}: {get_method_class(name).clean_data} from {n} clean images in {config.clean}")
    return setup.build_method(name, config.hyperparameters, config.batch_size, prepared)


def _adapt_stream(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int, folders: RunFolders,
                  console: Console, resume: bool) -> dict[str, Any]:
    loaded, device, out = setup.loaded, setup.device, folders.out
    changes = get_method_class(config.method).changes_predictions
    reference = source_reference_for(changes, config.source_reference, loaded.model)  # before the method
    method = _build_method(config, setup, console)
    distributed.check_world(config.batch_size, method.name, bool(stream.videos))
    distributed.barrier()  # every rank has checked the output folder before rank 0 writes into it
    if not config.predict_only and config.export_bn == "stream":
        track_stream_statistics(method, config.batch_size)  # on every rank: the statistics are global
    if not distributed.is_main():
        return _follow_stream(config, setup, stream, workers, method)
    monitor = monitor_for(method, loaded.num_classes, reference, config.on_collapse, config.batch_size)
    csv_files = (out / f"predictions.{config.format}", out / "errors.csv")
    point = resume_point(out, csv_files) if resume else None
    # From here to the last write, a signal is only noted: the stream takes it (signals.allowed in
    # _run_batches), and the start and the final writes finish whole before the run ends as interrupted.
    with signals.deferred():
        with disk_full_as_error(out):  # the run starts whole: outputs cleared, run.json
            folders.prepare()
            if not config.quiet:
                _print_plan(console, loaded, method, stream.describe(), device)
            if point is not None:
                truncate_outputs(csv_files, point)
                method.load_resume_state(point.method)
                set_rng_states(point.rng)
            else:
                method.reseed(config.seed)  # the method's own generator, seeded just before the first batch
            started = time.perf_counter()
            write_record(out, run_record(config, loaded, method, Totals(), device, out, "running", 0.0, 0))
            sinks = RunSinks(monitor, _export_folder(config, loaded), LastInputs())
            checkpointer = Checkpointer(out, method, csv_files, config.checkpoint_every, point,
                                        sinks={"monitor": monitor})
        outcome, engine_totals = _run_batches(config, setup, stream, workers, method, console, csv_files,
                                              checkpointer, point, sinks)
        totals = _with_timing(checkpointer.totals, engine_totals)
        signals.test_point("export")
        record = _finish(config, loaded, method, totals, device, out, after_signal(outcome),
                         time.perf_counter() - started, sinks)
        if after_signal(outcome).status != record["status"]:  # a signal came during the final writes
            record |= {"status": outcome.status, "reason": outcome.reason}
            write_record(out, record)
        if outcome.status == "completed":
            (out / CHECKPOINT).unlink(missing_ok=True)
    method.close()
    if not config.quiet:
        console.print(summary_table(record))
    if sinks.export is not None and sinks.export.failed:
        console.print(f"[yellow]warning: {len(sinks.export.failed)} images could not be exported to "
                      f"{sinks.export.directory} (listed in run.json)[/yellow]")
    return check_outcome(config, outcome, totals, out, console, record)


@dataclass
class RunSinks:
    """The sinks beside predictions, errors and progress: the collapse monitor (first: the writer
    reads its source predictions), the sorted export folder and the last inputs for the export check."""

    monitor: CollapseMonitor
    export: ExportFolder | None
    last: LastInputs


def _run_batches(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int, method: Method,
                 console: Console, csv_files: tuple[Path, Path], checkpointer: Checkpointer,
                 point: ResumePoint | None, sinks: RunSinks) -> tuple[Outcome, Totals | None]:
    """The stream through the engine; how it ended (completed, interrupted, failed) is the outcome."""
    outcome = Outcome()
    engine_totals = None
    for path in csv_files:
        refuse_symlink(path)
    predictions = PredictionsWriter(csv_files[0], setup.loaded.class_names, config.format, sinks.monitor,
                                    append=point is not None)
    errors = ErrorsWriter(csv_files[1], append=point is not None)
    progress = ProgressDisplay(console, stream.total, method, quiet=config.quiet,  # type: ignore[arg-type]
                               monitor=sinks.monitor)
    batches = _batches(config, setup, stream, workers, point)
    # with checkpoints, each batch is delivered before the next step, so that the state saved
    # is that of the last written prediction (one device sync per batch on a GPU)
    defer = False if config.checkpoint_every else None
    try:
        if point is None and config.checkpoint_every:
            checkpointer.save()  # resumable from the first image on
        with signals.allowed(), progress, distributed.peer_failures():
            extra = [*([sinks.export] if sinks.export else []),
                     *([] if config.predict_only or distributed.active() else [sinks.last])]
            actions = CollapseActions(sinks.monitor, method)
            outputs = [sinks.monitor, actions, predictions, errors, *extra, progress, checkpointer]
            gather = distributed.GatherToMain(outputs) if distributed.active() else None
            engine_totals = run_stream(method, batches, setup.device, [gather] if gather else outputs,
                                       defer=defer, tune_threads=setup.tune_threads)
            if gather is not None:
                engine_totals = distributed.merged_totals(engine_totals, gather.totals)
    except KeyboardInterrupt:
        outcome.status = "interrupted"
    except CollapseStop as stop:
        outcome = Outcome("collapsed", str(stop), stop)
    except Exception as err:  # recorded as failed, then raised again
        outcome = Outcome("failed", failure_reason(err), err)
    finally:
        batches.close()  # stops the decoding workers now
        _close_quietly(predictions, errors)
        if sinks.export is not None:
            sinks.export.close()
    return outcome, engine_totals


@dataclass
class CollapseActions:
    """The run's answer to a collapse the monitor found (``--on-collapse``): reset the method or stop
    the run; applied right after the monitor, before the batch is written or checkpointed, so that a
    resumed run resets where this one did. The monitor itself never acts on the method."""

    monitor: CollapseMonitor
    method: Method

    def on_batch(self, outputs: object) -> None:
        event = self.monitor.take_event()
        if event is None:
            return
        if event.action == "reset":
            self.method.reset()
        elif event.action == "stop":
            raise CollapseStop(event.batch)


def _batches(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int,
             point: ResumePoint | None = None) -> Any:
    """The stream's batches (after a resume point, the rest); data-parallel, this rank's rows of
    each, decoded here alone."""
    if distributed.active():
        return distributed.rank_batches(stream, setup.transform, config.batch_size,
                                        setup.loaded.data_config["input_size"], workers,
                                        setup.device.type == "cuda", config.max_pixels)
    rest, leftover = skip_consumed(stream, point.position.items) if point else (stream, 0)
    batches = setup.batches(rest, config.batch_size, workers, max_pixels=config.max_pixels, skip_decoded=leftover)
    return continued(batches, point.position.images) if point is not None else batches


def _follow_stream(config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int,
                   method: Method) -> dict[str, Any]:
    """A rank other than 0: adapt on its rows, send its outputs to rank 0, write nothing."""
    method.reseed(config.seed)
    with distributed.peer_failures():
        run_stream(method, _batches(config, setup, stream, workers), setup.device,
                   [distributed.GatherToMain([])], tune_threads=setup.tune_threads)
    method.close()
    return {"status": "completed", "rank": distributed.rank(), "world_size": distributed.world_size()}


def _close_quietly(*writers: PredictionsWriter | ErrorsWriter) -> None:
    for writer in writers:
        with contextlib.suppress(OSError):  # a full disk fails the last flush too; the rows before are whole
            writer.close()


def _with_timing(totals: Totals, engine: Totals | None) -> Totals:
    """The counts over the whole run (the checkpointer's, carried over a resume) with the engine's
    timing of this part."""
    if engine is not None:
        for name in ("data_wait_seconds", "data_waits", "device_busy_seconds", "device_idle_seconds", "cpu_threads"):
            setattr(totals, name, getattr(engine, name))
    return totals


def _finish(config: AdaptConfig, loaded: LoadedModel, method: Method, totals: Totals, device: torch.device,
            out: Path, outcome: Outcome, elapsed: float, sinks: RunSinks) -> dict[str, Any]:
    """Write what can be written: the model, extra exports and run.json with the outcome."""
    model_export = None
    try:
        if not config.predict_only:
            model_export = _export_run_model(config, loaded, method, out, sinks.last, device)
    except Exception as err:  # recorded as failed (a full disk most likely), raised after run.json
        if outcome.status != "failed":
            outcome.status, outcome.reason, outcome.error = "failed", failure_reason(err, out / "model"), err
    n_items = totals.images + totals.skipped
    record = run_record(config, loaded, method, totals, device, out, outcome.status, elapsed, n_items)
    if outcome.reason is not None:
        record["reason"] = outcome.reason
    record |= {"collapse_events": sinks.monitor.record(), "health": sinks.monitor.health()}
    if model_export is not None:
        record["model_export"] = model_export
        if "non_finite" in model_export:
            record["health"]["reasons"].append(model_export["non_finite"])
            if record["health"]["verdict"] in ("ok", "no-change"):
                record["health"]["verdict"] = "suspect"
    if sinks.export is not None:
        record["export_folder"] = export_folder_record(sinks.export)
    try:
        write_record(out, record)
    except OSError as err:
        if outcome.status != "failed":
            outcome.status, outcome.reason, outcome.error = "failed", failure_reason(err, out / "run.json"), err
    return record


def _export_folder(config: AdaptConfig, loaded: LoadedModel) -> ExportFolder | None:
    if config.export_folder is None:
        return None
    return ExportFolder(config.export_folder, loaded.class_names, config.export_mode, config.min_confidence,
                        overwrite=config.overwrite)


def _export_run_model(config: AdaptConfig, loaded: LoadedModel, method: Method, out: Path,
                      last: LastInputs, device: torch.device) -> dict[str, Any]:
    """Write ``model/`` (and a method's further exports); how it agrees with the late predictions."""
    state, bn_statistics = exported_state(method, config.export_bn)
    problem = None
    if not _all_finite(state):
        problem = "the exported model holds non-finite values"
        if bn_statistics == "stream":  # the stream's statistics took in non-finite activations
            state, bn_statistics = exported_state(method, "source")
            problem = ("the stream's BatchNorm statistics were not finite: the model keeps the source's"
                       if _all_finite(state) else problem)
    export_model(loaded, state, out / "model")
    _write_extra_exports(method, out)
    record = {"bn_statistics": bn_statistics, "agreement": agreement(out / "model", last, device)}
    return record | ({"non_finite": problem} if problem else {})


def _all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def _write_extra_exports(method: Method, out: Path) -> None:
    """Further state dicts a method exports (e.g. a teacher-student method's student)."""
    from safetensors.torch import save_file

    for filename, state in method.extra_exports().items():
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(out / filename, lambda path, tensors=tensors: save_file(tensors, str(path)))


def _print_plan(console: Console, loaded: LoadedModel, method: Method, stream: str,
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


