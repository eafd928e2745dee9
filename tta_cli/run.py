"""``tta adapt`` as a library call: model, stream, method, engine and sinks wired together."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from tta_cli import __version__, distributed, signals
from tta_cli.atomic import refuse_symlink
from tta_cli.checkpoint import (
    CHECKPOINT,
    Checkpointer,
    ResumePoint,
    check_same_weights,
    config_from_record,
    continued,
    resume_point,
    set_rng_states,
    skip_consumed,
    truncate_outputs,
)
from tta_cli.choices import EXPORT_BN, EXPORT_MODES, ON_COLLAPSE, PREDICTION_FORMATS, SOURCE_REFERENCE
from tta_cli.config import AdaptConfig, default_workers
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods import Method, get_method_class
from tta_cli.models import LoadedModel
from tta_cli.monitor import CollapseMonitor, CollapseStop, monitor_for
from tta_cli.outcome import Outcome, after_signal, check_outcome, disk_full_as_error, failure_reason
from tta_cli.outputs import Sink, Totals
from tta_cli.ownership import start_manifest
from tta_cli.record import export_folder_record, run_record, write_record
from tta_cli.reference import SourceReference, source_reference_for
from tta_cli.run_folders import RunFolders
from tta_cli.runtime import (
    RunSetup,
    SpeedOptions,
    check_precision,
    method_name,
    start_run,
    uses_clean_data,
)
from tta_cli.sinks.export_folder import ExportFolder
from tta_cli.sinks.model_export import LastInputs, add_to_record, export_run_model, track_stream_statistics
from tta_cli.sinks.predictions import ErrorsWriter, PredictionsWriter
from tta_cli.sinks.progress import ProgressDisplay, print_plan, summary_table
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
    writes the outputs (``tta_cli.distributed``, docs/DISTRIBUTED.md). The source reference predicts
    each rank's rows and rank 0 gathers them with the outputs; the per-image sinks that need the
    images themselves (export folder, export check) and checkpoints are off there: rank 0 sees the
    gathered outputs, not every rank's images.
    """
    device = distributed.start(config.device)
    if distributed.active():
        if resume:
            raise TTAError("--resume is not supported under torchrun", "resume the run in one process")
        config = replace(config, device=device, quiet=config.quiet or not distributed.is_main(),
                         checkpoint_every=0)
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
                return Run(config, setup, stream, workers, folders, console, resume).execute()
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
               "export_bn": (config.export_bn, EXPORT_BN), "on_collapse": (config.on_collapse, ON_COLLAPSE),
               "source_reference": (config.source_reference, SOURCE_REFERENCE)}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise TTAError(f"unknown --{name.replace('_', '-')} {value!r}", f"choose from {', '.join(allowed)}")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise TTAError(f"--min-confidence must be between 0 and 1, got {config.min_confidence}")


def predict(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """``tta predict``: the adapt flow with the ``source`` method (eval mode, no update) and no
    model export; the same inputs, labels, bad-file handling, predictions, errors.csv and run.json."""
    return adapt(replace(config, method="source", hyperparameters={}, clean=None, predict_only=True), console)


class Run:
    """One ``tta adapt`` run, wired in one place: the stream's batches -> the engine (with the source
    reference's pass) -> the method -> the sinks (collapse monitor, predictions, errors, export
    folder, progress, checkpoints) -> the outputs (the model, run.json) and the outcome.

    The run holds the one ``Totals`` (the engine adds each batch before the sinks see it; a resumed
    run starts from the checkpoint's), answers the monitor's collapse events between batches
    (``CollapseActions``) and gathers the state a checkpoint keeps.
    """

    def __init__(self, config: AdaptConfig, setup: RunSetup, stream: Stream, workers: int, folders: RunFolders,
                 console: Console, resume: bool) -> None:
        self.config, self.setup, self.stream, self.workers = config, setup, stream, workers
        self.folders, self.console, self.resume = folders, console, resume
        self.out = folders.out
        self.csv_files = (self.out / f"predictions.{config.format}", self.out / "errors.csv")
        changes = get_method_class(config.method).changes_predictions
        # the frozen source copy is made before the method wraps (and changes) the model
        self.reference = source_reference_for(config.source_reference, changes, setup.loaded.model,
                                              config.batch_size)
        self.method = _build_method(config, setup, console)
        if self.reference is not None:
            self.reference.configure(self.method.performance.channels_last)
        self.monitor = monitor_for(self.method, setup.loaded.num_classes, self.reference is not None,
                                   config.on_collapse, config.batch_size)
        self.point: ResumePoint | None = None
        self.totals = Totals()
        self.export = _export_folder(config, setup.loaded)
        self.last = LastInputs()

    def execute(self) -> dict[str, Any]:
        config, method = self.config, self.method
        distributed.check_world(config.batch_size, method.name, bool(self.stream.videos))
        distributed.barrier()  # every rank has checked the output folder before rank 0 writes into it
        if not config.predict_only and config.export_bn == "stream":
            track_stream_statistics(method, config.batch_size)  # on every rank: the statistics are global
        if not distributed.is_main():
            return _follow_stream(config, self.setup, self.stream, self.workers, method, self.reference)
        self.point = resume_point(self.out, self.csv_files) if self.resume else None
        # From here to the last write, a signal is only noted: the stream takes it (signals.allowed in
        # stream_batches), and the start and the final writes finish whole before the run ends as interrupted.
        with signals.deferred():
            checkpointer = self.start()
            started = time.perf_counter()
            outcome, engine_totals = self.stream_batches(checkpointer)
            if engine_totals is not None:
                self.totals.take_timings(engine_totals)
            signals.test_point("export")
            record = self.finish(after_signal(outcome), time.perf_counter() - started)
            if after_signal(outcome).status != record["status"]:  # a signal came during the final writes
                record |= {"status": outcome.status, "reason": outcome.reason}
                write_record(self.out, record)
            if outcome.status == "completed":
                (self.out / CHECKPOINT).unlink(missing_ok=True)
        method.close()
        if not config.quiet:
            self.console.print(summary_table(record))
        if self.export is not None and self.export.failed:
            self.console.print(f"[yellow]warning: {len(self.export.failed)} images could not be exported to "
                               f"{self.export.directory} (listed in run.json)[/yellow]")
        return check_outcome(config, outcome, self.totals, self.out, self.console, record)

    def start(self) -> Checkpointer:
        """The run starts whole: outputs cleared (or cut back to the checkpoint), state restored,
        run.json says running."""
        config, method, point = self.config, self.method, self.point
        with disk_full_as_error(self.out):
            self.folders.prepare()
            if not config.quiet:
                print_plan(self.console, self.setup.loaded, method, self.stream.describe(), self.setup.device,
                           self.reference)
            method.mark_initial_tensors()  # checkpoints keep only the tensors that change from here
            if point is not None:
                check_same_weights(point, self.setup.loaded.weights_sha256, self.out)
                truncate_outputs(self.csv_files, point)
                method.load_resume_state(point.method)
                if "monitor" in point.sinks:
                    self.monitor.load_resume_state(point.sinks["monitor"])
                set_rng_states(point.rng)
                self.totals = point.totals
            else:
                method.reseed(config.seed)  # the method's own generator, seeded just before the first batch
            write_record(self.out, run_record(config, self.setup.loaded, method, Totals(), self.setup.device,
                                              self.out, "running", 0.0, 0))
            return Checkpointer(self.out, self.resume_state, self.csv_files, config.checkpoint_every,
                                self.totals, point)

    def resume_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the method and the sinks (``tta_cli.checkpoint``)."""
        return {"method": self.method.state_for_resume(), "sinks": {"monitor": self.monitor.state_for_resume()},
                "weights_sha256": self.setup.loaded.weights_sha256}

    def sinks(self, checkpointer: Checkpointer) -> tuple[list[Sink], PredictionsWriter, ErrorsWriter,
                                                         ProgressDisplay]:
        """The sinks in order: the monitor and its collapse actions first (a reset happens before the
        batch is written or checkpointed, so a resumed run resets where this one did)."""
        config, append = self.config, self.point is not None
        for path in self.csv_files:
            refuse_symlink(path)
        predictions = PredictionsWriter(self.csv_files[0], self.setup.loaded.class_names, config.format,
                                        source_columns=self.reference is not None, append=append)
        errors = ErrorsWriter(self.csv_files[1], append=append)
        progress = ProgressDisplay(self.console, self.stream.total, self.method, quiet=config.quiet,
                                   monitor=self.monitor, totals=self.totals)
        extra = [*([self.export] if self.export else []),
                 *([] if config.predict_only or distributed.active() else [self.last])]
        sinks: list[Sink] = [self.monitor, CollapseActions(self.monitor, self.method), predictions, errors, *extra,
                             progress, checkpointer]
        return sinks, predictions, errors, progress

    def stream_batches(self, checkpointer: Checkpointer) -> tuple[Outcome, Totals | None]:
        """The stream through the engine; how it ended (completed, interrupted, failed) is the outcome.
        Under torchrun, the engine's own totals (rank 0's timings) are returned beside."""
        config, setup = self.config, self.setup
        outcome, engine_totals = Outcome(), None
        sinks, predictions, errors, progress = self.sinks(checkpointer)
        batches = _batches(config, setup, self.stream, self.workers, self.point)
        # with checkpoints, each batch is delivered before the next step, so that the state saved
        # is that of the last written prediction (one device sync per batch on a GPU)
        defer = False if config.checkpoint_every else None
        try:
            if self.point is None and config.checkpoint_every:
                checkpointer.save()  # resumable from the first image on
            with signals.allowed(), progress, distributed.peer_failures():
                if distributed.active():
                    gather = distributed.GatherToMain(sinks, self.totals)
                    engine_totals = run_stream(self.method, batches, setup.device, [gather], defer=defer,
                                               tune_threads=setup.tune_threads, reference=self.reference)
                else:
                    run_stream(self.method, batches, setup.device, sinks, defer=defer, tune_threads=setup.tune_threads,
                               reference=self.reference, totals=self.totals)
        except KeyboardInterrupt:
            outcome.status = "interrupted"
        except CollapseStop as stop:
            outcome = Outcome("collapsed", str(stop), stop)
        except Exception as err:  # recorded as failed, then raised again
            outcome = Outcome("failed", failure_reason(err), err)
        finally:
            batches.close()  # stops the decoding workers now
            _close_quietly(predictions, errors)
            if self.export is not None:
                self.export.close()
        return outcome, engine_totals

    def finish(self, outcome: Outcome, elapsed: float) -> dict[str, Any]:
        """Write what can be written: the model, extra exports and run.json with the outcome."""
        config, totals = self.config, self.totals
        model_export = None
        try:
            if not config.predict_only:
                model_export = export_run_model(self.setup.loaded, self.method, config.export_bn, self.out, self.last,
                                                self.setup.device)
        except Exception as err:  # recorded as failed (a full disk most likely), raised after run.json
            if outcome.status != "failed":
                outcome.status, outcome.reason, outcome.error = "failed", failure_reason(err, self.out / "model"), err
        n_items = totals.images + totals.skipped
        record = run_record(config, self.setup.loaded, self.method, totals, self.setup.device, self.out,
                            outcome.status, elapsed, n_items)
        if outcome.reason is not None:
            record["reason"] = outcome.reason
        record |= {"collapse_events": self.monitor.record(), "health": self.monitor.health()}
        add_to_record(record, model_export)
        if self.export is not None:
            record["export_folder"] = export_folder_record(self.export)
        try:
            write_record(self.out, record)
        except OSError as err:
            if outcome.status != "failed":
                outcome.status, outcome.reason = "failed", failure_reason(err, self.out / "run.json")
                outcome.error = err
        return record


def _build_method(config: AdaptConfig, setup: RunSetup, console: Console) -> Method:
    name = method_name(config.method, config.clean is not None, console)
    prepared = None
    if config.clean is not None and uses_clean_data(name):
        clean = folder_items(config.clean, setup.loaded.class_names)
        prepared, n = setup.prepare(name, clean, config.batch_size, config.hyperparameters)
        if not config.quiet:
            console.print(f"{name}: {get_method_class(name).clean_data} from {n} clean images in {config.clean}")
    return setup.build_method(name, config.hyperparameters, config.batch_size, prepared)


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
                   method: Method, reference: SourceReference | None) -> dict[str, Any]:
    """A rank other than 0: adapt on its rows (and the source reference's pass on them), send its
    outputs to rank 0, write nothing."""
    method.reseed(config.seed)
    with distributed.peer_failures():
        run_stream(method, _batches(config, setup, stream, workers), setup.device,
                   [distributed.GatherToMain([])], tune_threads=setup.tune_threads, reference=reference)
    method.close()
    return {"status": "completed", "rank": distributed.rank(), "world_size": distributed.world_size()}


def _close_quietly(*writers: PredictionsWriter | ErrorsWriter) -> None:
    for writer in writers:
        with contextlib.suppress(OSError):  # a full disk fails the last flush too; the rows before are whole
            writer.close()


def _export_folder(config: AdaptConfig, loaded: LoadedModel) -> ExportFolder | None:
    if config.export_folder is None:
        return None
    return ExportFolder(config.export_folder, loaded.class_names, config.export_mode, config.min_confidence,
                        overwrite=config.overwrite)
