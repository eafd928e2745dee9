"""``tta bench``: every method on every stream of every setting, each run on a fresh source model.

Each run is set up by ``tta_cli.runtime`` (as ``tta adapt`` is) and adapts in ``run_stream``. This
module only decides what runs, gives each run a pristine copy of the model, records per-run
results and per-window curves, and shows progress across runs.
"""

from __future__ import annotations

import csv
import json
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tta_cli.bench.corrupt import CorruptPlan, corrupt_folder, list_class_images
from tta_cli.bench.data import CorruptedSet, find_corrupted, limit_items
from tta_cli.bench.settings import BenchStream, build_streams
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods import get_method_class
from tta_cli.models import LoadedModel
from tta_cli.outputs import BatchOutputs, Sink
from tta_cli.runtime import (
    Fishers,
    RunSetup,
    SpeedOptions,
    check_precision,
    method_name,
    prepare_out_dir,
    seed_everything,
    start_run,
    versions,
)
from tta_cli.sources.folder import folder_items
from tta_cli.sources.items import Batch, StreamItem

WINDOW = 64
"""Images per point of the stream curves (one batch at B = 64; 64 batches at B = 1)."""
ONE_CLASS_SHARE = 0.9
"""A model that gives one class to this share of the last tenth, mostly wrongly, has collapsed."""
RESULTS = "results.csv"
CURVES = "curves.csv"


@dataclass(frozen=True)
class MethodSpec:
    """A method with optional hyperparameters: ``sar`` or ``norm:bn_stats=batch:bn_alpha=0.2``."""

    label: str
    name: str
    hyperparameters: dict[str, str] = field(default_factory=dict)


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    parts = [text] if isinstance(text, str) else list(text)
    specs: list[MethodSpec] = []
    for entry in (p.strip() for part in parts for p in part.split(",")):
        if not entry:
            continue
        name, *pairs = entry.split(":")
        hyperparameters = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise TTAError(f"invalid method hyperparameter {pair!r} in {entry!r}", "use method:key=value")
            hyperparameters[key.strip()] = value.strip()
        get_method_class(name)  # unknown names fail here, with close matches
        if entry not in [s.label for s in specs]:
            specs.append(MethodSpec(entry, name.strip().lower(), hyperparameters))
    if not specs:
        raise TTAError("no method given", "e.g. --methods source,norm,tent,eata,sar")
    return specs


@dataclass
class BenchConfig:
    model: str
    data: Path
    out: Path
    methods: list[MethodSpec]
    settings: list[str]
    corruptions: list[str] | None = None
    severity: int = 5
    limit: int | None = None
    bs1_limit: int | None = None
    batch_size: int = 64
    clean: Path | None = None
    fisher_size: int = 2000
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    threads: int | None = None
    checkpoint: Path | None = None
    pretrained: bool = True
    resume: bool = False
    overwrite: bool = False
    plots: bool = True
    quiet: bool = False
    cache_mb: int = 1024
    """Decoded streams up to this size are kept in memory and shared by the methods."""
    precision: str = "fp32"
    channels_last: str = "auto"
    compile: bool = False
    """Speed options, as for ``tta adapt`` (``tta_cli.runtime.SpeedOptions``)."""

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["methods"] = [m.label for m in self.methods]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}


@dataclass
class RunResult:
    """One method on one stream."""

    model: str
    setting: str
    corruption: str
    method: str
    batch_size: int
    images: int
    correct: int
    accuracy: float
    last_tenth_accuracy: float
    collapsed: bool
    resets: int
    used_share: float
    mean_entropy: float
    adapt_seconds: float
    wall_seconds: float
    lr: float | None
    last_tenth_top_share: float | None = None
    """Share of the last tenth's predictions that go to its most predicted class."""

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model, self.setting, self.corruption, self.method)


RESULT_FIELDS = [f.name for f in fields(RunResult)]
CURVE_FIELDS = ["model", "setting", "corruption", "method", "window", "images", "n", "correct",
                "entropy_sum", "resets"]


class CurveRecorder:
    """A sink: per-batch correct counts (for the last-tenth collapse test) and windowed curves."""

    def __init__(self) -> None:
        self.per_batch: list[tuple[int, int, torch.Tensor]] = []
        self.windows: list[dict[str, float]] = []
        self._open: dict[str, float] = {}
        self.images = 0

    def on_batch(self, out: BatchOutputs) -> None:
        n = len(out.batch.items)
        if not n:
            return
        correct = out.correct
        hits = int(correct.sum()) if correct is not None else 0
        self.per_batch.append((n, hits, out.pred))
        self.images += n
        w = self._open or {"n": 0, "correct": 0, "entropy_sum": 0.0, "resets": 0}
        w["n"] += n
        w["correct"] += hits
        w["entropy_sum"] += float(out.entropy.sum())
        w["resets"] += int(out.reset)
        self._open = w
        if w["n"] >= WINDOW:
            self._close()

    def _close(self) -> None:
        if self._open:
            self.windows.append(self._open | {"images": self.images})
            self._open = {}

    def finish(self) -> list[dict[str, float]]:
        self._close()
        return self.windows

    def last_tenth(self) -> tuple[float, float]:
        """(accuracy, share of the most predicted class) over the last tenth of the stream, in
        whole batches and at least one window (a tenth of a short stream is too noisy)."""
        need = max(min(WINDOW, self.images), self.images // 10)
        n = hits = 0
        preds: list[torch.Tensor] = []
        for size, correct, pred in reversed(self.per_batch):
            n += size
            hits += correct
            preds.append(pred)
            if n >= need:
                break
        if not n:
            return 0.0, 0.0
        top = int(torch.cat(preds).bincount().max())
        return hits / n, top / n

    def last_tenth_accuracy(self) -> float:
        return self.last_tenth()[0]


def is_collapsed(accuracy: float, top_share: float, num_classes: int) -> bool:
    """At or below chance (the spec's test), or one class for nearly everything and mostly wrong:
    a model collapsed onto one class scores that class's share of the stream, which on a shuffled
    stream is a little above chance as often as below it."""
    return accuracy <= 1.0 / num_classes or (top_share >= ONE_CLASS_SHARE and accuracy < 0.5)


class BenchProgress:
    """Rich progress across runs: one bar for the runs, one for the images of the current run."""

    def __init__(self, console: Console, total_runs: int, quiet: bool) -> None:
        self.console = console
        self.quiet = quiet
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[stats]}"),
            console=console, disable=quiet, transient=False,
        )
        self._runs = self._progress.add_task("runs", total=total_runs, stats="")
        self._run: Any = None
        self._images = self._correct = 0
        self._started = time.perf_counter()

    def __enter__(self) -> BenchProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start_run(self, description: str, total: int) -> None:
        self._images = self._correct = 0
        self._started = time.perf_counter()
        if self._run is not None:
            self._progress.remove_task(self._run)
        self._run = self._progress.add_task(description, total=total, stats="")

    def on_batch(self, out: BatchOutputs) -> None:
        correct = out.correct
        self._images += len(out.batch.items)
        self._correct += int(correct.sum()) if correct is not None else 0
        rate = self._images / max(time.perf_counter() - self._started, 1e-9)
        stats = f"acc {100 * self._correct / max(self._images, 1):.1f}%  {rate:.1f} img/s"
        self._progress.update(self._run, advance=len(out.batch.items) + len(out.batch.skipped), stats=stats)

    def end_run(self, result: RunResult) -> None:
        self._progress.advance(self._runs)
        if not self.quiet:
            flag = "  [red]collapsed[/red]" if result.collapsed else ""
            self._progress.console.print(
                f"{result.setting:>15s} {result.corruption:<17s} {result.method:<12s} "
                f"acc {100 * result.accuracy:5.1f}%  resets {result.resets:3d}  "
                f"{1000 * result.adapt_seconds / max(result.images, 1):6.1f} ms/img{flag}")

    def skip(self, n: int = 1) -> None:
        self._progress.advance(self._runs, n)


# --- data ------------------------------------------------------------------------------------------


def prepare_data(config: BenchConfig, loaded: LoadedModel, console: Console) -> CorruptedSet:
    """The corrupted set of ``--data``; a clean class-foldered set is corrupted into ``OUT/data``."""
    from tta_cli.bench.corrupt import CORRUPTIONS

    found = find_corrupted(config.data, loaded.class_names, config.severity, config.corruptions)
    if found is not None:
        return found
    list_class_images(config.data)  # a clear error if it is not a class-foldered set either
    target = config.out / "data"
    plan = CorruptPlan(config.data, target, config.corruptions or list(CORRUPTIONS), [config.severity],
                       config.seed, config.limit)
    if not config.quiet:
        console.print(f"{config.data} holds clean images: corrupting {len(plan.corruptions)} corruptions at "
                      f"severity {config.severity} into {target}")
    report = corrupt_folder(plan)
    if report.failed:
        console.print(f"[yellow]{len(report.failed)} images could not be read "
                      f"(e.g. {report.failed[0][0]})[/yellow]")
    found = find_corrupted(target, loaded.class_names, config.severity, plan.corruptions)
    assert found is not None
    return found


def batch_source(stream: BenchStream, setup: RunSetup, workers: int, cache_bytes: int,
                 image_bytes: int) -> Callable[[], Iterable[Batch]]:
    """Batches of the stream, decoded once and shared by every method when they fit in the cache;
    else decoded again for each run (the methods never modify their input)."""
    def decode() -> Iterator[Batch]:
        return setup.batches(stream.items, stream.batch_size, workers)

    if len(stream.items) * image_bytes > cache_bytes:
        return decode
    cached: list[Batch] = []

    def from_cache() -> Iterable[Batch]:
        if not cached:
            cached.extend(decode())
        return cached

    return from_cache


def image_bytes(loaded: LoadedModel) -> int:
    channels, height, width = loaded.data_config["input_size"]
    return int(channels * height * width * 4)


# --- one run ---------------------------------------------------------------------------------------


class FisherCache:
    """EATA's Fisher information per batch size and hyperparameters: it depends only on those,
    the source model and the clean images, so it is computed once and shared by every such run."""

    def __init__(self, setup: RunSetup, clean: list[StreamItem]) -> None:
        self.setup = setup
        self.clean = clean
        self._fishers: dict[tuple[int, str], Fishers] = {}

    def get(self, batch_size: int, hyperparameters: dict[str, str]) -> Fishers:
        key = (batch_size, json.dumps(hyperparameters, sort_keys=True))
        if key not in self._fishers:
            self._fishers[key], _ = self.setup.fisher_information(self.clean, batch_size, hyperparameters)
        return self._fishers[key]


def run_one(stream: BenchStream, spec: MethodSpec, setup: RunSetup, batches: Iterable[Batch],
            fisher: FisherCache | None, progress: BenchProgress, seed: int,
            sinks: Sequence[Sink] = ()) -> tuple[RunResult, list[dict[str, float]]]:
    """One method on one stream, from a pristine copy of the source model; ``sinks`` see the
    per-sample outputs too."""
    seed_everything(seed)
    fishers = fisher.get(stream.batch_size, spec.hyperparameters) if spec.name == "eata" and fisher else None
    method = setup.build_method(spec.name, spec.hyperparameters, stream.batch_size, fishers, fresh_copy=True)
    method.reseed(seed)  # as tta adapt: the method's own generator, seeded just before the first batch
    recorder = CurveRecorder()
    progress.start_run(f"{stream.name} {spec.label}", len(stream.items))
    started = time.perf_counter()
    totals = run_stream(method, batches, setup.device, [recorder, progress, *sinks],
                        tune_threads=setup.tune_threads)
    wall = time.perf_counter() - started
    info = method.describe()
    method.close()
    last, top_share = recorder.last_tenth()
    loaded = setup.loaded
    result = RunResult(
        model=loaded.spec, setting=stream.setting, corruption=stream.corruption, method=spec.label,
        batch_size=stream.batch_size, images=totals.images, correct=totals.correct,
        accuracy=totals.accuracy or 0.0, last_tenth_accuracy=last,
        collapsed=is_collapsed(last, top_share, loaded.num_classes), resets=totals.resets,
        used_share=totals.used_share or 0.0, mean_entropy=totals.mean_entropy or 0.0,
        adapt_seconds=totals.adapt_seconds, wall_seconds=wall, lr=info["lr"], last_tenth_top_share=top_share,
    )
    return result, recorder.finish()


# --- output files ----------------------------------------------------------------------------------


def prepare_out(config: BenchConfig) -> set[tuple[str, str, str, str]]:
    """Create ``--out``; the keys of the runs already in its results.csv when resuming."""
    out = config.out
    if out.exists() and not out.is_dir():
        raise TTAError(f"output path {out} exists and is not a folder")
    results = out / RESULTS
    if results.is_file() and config.resume:
        _check_resumable(config)
        return {RunResult(**r).key for r in read_results(results)}  # type: ignore[arg-type]
    prepare_out_dir(out, config.overwrite, ignore=("data",),
                    hint="pass --resume to continue its runs, --overwrite to start again, or another --out")
    for name in (RESULTS, CURVES):
        (out / name).unlink(missing_ok=True)
    return set()


RESUME_KEYS = ("model", "data", "checkpoint", "severity", "limit", "bs1_limit", "batch_size", "seed", "clean",
               "fisher_size")


def _check_resumable(config: BenchConfig) -> None:
    """Resuming mixes old and new runs in one table: they must share the streams and the model."""
    path = config.out / "bench.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text()).get("config", {})
    now = config.to_record()
    changed = [k for k in RESUME_KEYS if k in before and before[k] != now[k]]
    if changed:
        raise TTAError(f"cannot resume {config.out}: {', '.join(changed)} changed since its runs",
                       "use the same options, or another --out")


def _coerce(name: str, value: str) -> Any:
    kind = {f.name: f.type for f in fields(RunResult)}[name]
    if value == "":
        return None
    if kind == "int":
        return int(value)
    if kind in ("float", "float | None"):
        return float(value)
    if kind == "bool":
        return value == "True"
    return value


def read_results(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="") as f:
        return [{k: _coerce(k, v) for k, v in row.items() if k in RESULT_FIELDS} for row in csv.DictReader(f)]


def append_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def save_run(out: Path, result: RunResult, windows: list[dict[str, float]]) -> None:
    """Append one run to results.csv and curves.csv as soon as it ends (a long benchmark resumes)."""
    row = asdict(result)
    for key in ("accuracy", "last_tenth_accuracy", "used_share", "mean_entropy", "last_tenth_top_share"):
        row[key] = f"{row[key]:.6f}"
    append_rows(out / RESULTS, RESULT_FIELDS, [row])
    head = {"model": result.model, "setting": result.setting, "corruption": result.corruption,
            "method": result.method}
    curve = [head | {"window": i} | {k: w[k] for k in ("images", "n", "correct", "entropy_sum", "resets")}
             for i, w in enumerate(windows)]
    append_rows(out / CURVES, CURVE_FIELDS, curve)


def write_record(config: BenchConfig, loaded: LoadedModel, data: CorruptedSet, streams: list[BenchStream],
                 device: torch.device, started: str) -> None:
    record = {
        "config": config.to_record(),
        "started": started,
        "finished": datetime.now().isoformat(timespec="seconds"),
        "model": loaded.describe(),
        "preprocessing": loaded.data_config,
        "data": {"root": str(data.root), "layout": data.layout,
                 "images_per_corruption": {c: len(v) for c, v in data.by_corruption.items()}},
        "streams": [{"name": s.name, "images": len(s.items), "batch_size": s.batch_size} for s in streams],
        "machine": {"device": str(device), "platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "versions": versions(),
    }
    (config.out / "bench.json").write_text(json.dumps(record, indent=2))


# --- the benchmark ---------------------------------------------------------------------------------


def _clean_items(config: BenchConfig, loaded: LoadedModel) -> list[StreamItem]:
    items = folder_items(config.clean, loaded.class_names) if config.clean is not None else []
    if len(items) > config.fisher_size:
        keep = sorted(random.Random(config.seed).sample(range(len(items)), config.fisher_size))
        items = [items[i] for i in keep]
    return items


def _resolve_methods(config: BenchConfig, console: Console) -> list[MethodSpec]:
    """The methods that run: without clean images EATA runs, and is reported, as ETA."""
    specs: list[MethodSpec] = []
    for spec in config.methods:
        name = method_name(spec.name, config.clean is not None, None if config.quiet else console)
        if name != spec.name:
            spec = MethodSpec(spec.label.replace(spec.name, name, 1), name, spec.hyperparameters)
        if spec.label not in [s.label for s in specs]:
            specs.append(spec)
    return specs


def run_benchmark(config: BenchConfig, console: Console | None = None) -> list[RunResult]:
    """Run every (stream, method) pair not yet in ``OUT/results.csv``; write the report."""
    from tta_cli.bench.report import write_report

    console = console or Console(stderr=True)
    started = datetime.now().isoformat(timespec="seconds")
    check_precision(config.precision)
    done = prepare_out(config)
    record = config.out / "bench.json"
    if done and record.is_file():  # a resumed benchmark started with its first runs
        started = json.loads(record.read_text()).get("started", started)
    speed = SpeedOptions(config.precision, config.channels_last, config.compile)
    setup = start_run(config.model, pretrained=config.pretrained, checkpoint=config.checkpoint,
                      device=config.device, seed=config.seed, threads=config.threads, speed=speed)
    loaded, device = setup.loaded, setup.device
    data = prepare_data(config, loaded, console)
    by_corruption = limit_items(data.by_corruption, config.limit, config.seed)
    streams = build_streams(by_corruption, config.settings, config.batch_size, config.seed, config.bs1_limit)
    methods = _resolve_methods(config, console)
    clean = _clean_items(config, loaded)
    fisher = FisherCache(setup, clean) if clean else None
    write_record(config, loaded, data, streams, device, started)
    results = _run_all(config, setup, streams, methods, fisher, done, console)
    write_record(config, loaded, data, streams, device, started)
    write_report(config.out, loaded.num_classes, plots=config.plots, console=console)
    return results


def _run_all(config: BenchConfig, setup: RunSetup, streams: list[BenchStream], methods: list[MethodSpec],
             fisher: FisherCache | None, done: set[tuple[str, str, str, str]],
             console: Console) -> list[RunResult]:
    loaded = setup.loaded
    results: list[RunResult] = []
    with BenchProgress(console, len(streams) * len(methods), config.quiet) as progress:
        for stream in streams:
            todo = [m for m in methods
                    if (loaded.spec, stream.setting, stream.corruption, m.label) not in done]
            progress.skip(len(methods) - len(todo))
            batches = batch_source(stream, setup, config.workers, config.cache_mb << 20,
                                   image_bytes(loaded))
            for spec in todo:
                result, windows = run_one(stream, spec, setup, batches(), fisher, progress, config.seed)
                save_run(config.out, result, windows)
                progress.end_run(result)
                results.append(result)
    return results
