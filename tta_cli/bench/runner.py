"""``tta bench``: every method on every stream of every setting, each run on a fresh source model.

Each run is set up by ``tta_cli.runtime`` (as ``tta adapt`` is) and adapts in ``run_stream``. This
module only decides what runs, gives each run a pristine copy of the model, records per-run
results and per-window curves, and shows progress across runs.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli.bench.corrupt import CorruptPlan, corrupt_folder, list_class_images
from tta_cli.bench.data import CorruptedSet, find_corrupted, find_levels, limit_items
from tta_cli.bench.online import EveryKth, online_k
from tta_cli.bench.progress import BenchProgress
from tta_cli.bench.results import (
    CURVES,
    RESULTS,
    CurveRecorder,
    RunResult,
    is_collapsed,
    is_source,
    read_results,
    save_run,
)
from tta_cli.bench.settings import DIRICHLET_CONCENTRATION, BenchStream, build_streams
from tta_cli.engine import run_stream
from tta_cli.errors import TTAError
from tta_cli.methods import get_method_class, list_methods
from tta_cli.models import LoadedModel
from tta_cli.outputs import Sink
from tta_cli.runtime import (
    Prepared,
    RunSetup,
    SpeedOptions,
    check_precision,
    method_name,
    prepare_out_dir,
    seed_everything,
    start_run,
    uses_clean_data,
    versions,
)
from tta_cli.sources.folder import folder_items
from tta_cli.sources.items import Batch, StreamItem


@dataclass(frozen=True)
class MethodSpec:
    """A method with optional hyperparameters: ``sar`` or ``norm:bn_stats=batch:bn_alpha=0.2``."""

    label: str
    name: str
    hyperparameters: dict[str, str] = field(default_factory=dict)


def all_methods() -> list[str]:
    """Every registered method, ``source`` first (the others' speed is measured against it)."""
    return sorted(list_methods(), key=lambda name: not is_source(name))


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """Comma-separated method specs; ``all`` is every registered method."""
    parts = [text] if isinstance(text, str) else list(text)
    specs: list[MethodSpec] = []
    entries = [p.strip() for part in parts for p in part.split(",")]
    entries = [name for e in entries for name in (all_methods() if e.lower() == "all" else [e])]
    for entry in entries:
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


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or a range ``0-4``: the stream seeds."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep and low else [int(part)]
        except ValueError:
            raise TTAError(f"invalid seed {part!r}", "use integers, e.g. --seeds 0,1,2 or 0-4") from None
        seeds += [v for v in values if v not in seeds]
    if not seeds:
        raise TTAError("no seed given", "e.g. --seeds 0,1,2")
    return seeds


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
    seeds: list[int] | None = None
    """Stream seeds: each cell runs once per seed, with that seed's stream order (default: [seed])."""
    concentration: float = DIRICHLET_CONCENTRATION
    online: bool = True
    """Re-run methods slower than source in the online view (adapting on every k-th batch)."""

    @property
    def stream_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed]

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["methods"] = [m.label for m in self.methods]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}


# --- data ------------------------------------------------------------------------------------------


def prepare_data(config: BenchConfig, loaded: LoadedModel, console: Console) -> CorruptedSet:
    """The corrupted set of ``--data``; a clean class-foldered set is corrupted into ``OUT/data``."""
    from tta_cli.bench.corrupt import CORRUPTIONS

    found = find_corrupted(config.data, loaded.class_names, config.severity, config.corruptions)
    if found is not None:
        return found
    list_class_images(config.data)  # a clear error if it is not a class-foldered set either
    target = config.out / "data"
    severities = [1, 2, 3, 4, 5] if "gradual" in config.settings else [config.severity]
    plan = CorruptPlan(config.data, target, config.corruptions or list(CORRUPTIONS), severities,
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


class CleanDataCache:
    """What the methods learn from the clean images (``TTAMethod.prepare``; EATA's Fisher
    information) per method, batch size and hyperparameters: it depends only on those, the source
    model and the clean images, so it is computed once and shared by every such run."""

    def __init__(self, setup: RunSetup, clean: list[StreamItem]) -> None:
        self.setup = setup
        self.clean = clean
        self._prepared: dict[tuple[str, int, str], Prepared] = {}

    def get(self, name: str, batch_size: int, hyperparameters: dict[str, str]) -> Prepared:
        key = (name, batch_size, json.dumps(hyperparameters, sort_keys=True))
        if key not in self._prepared:
            self._prepared[key], _ = self.setup.prepare(name, self.clean, batch_size, hyperparameters)
        return self._prepared[key]


def run_one(stream: BenchStream, spec: MethodSpec, setup: RunSetup, batches: Iterable[Batch],
            clean: CleanDataCache | None, progress: BenchProgress, seed: int,
            sinks: Sequence[Sink] = (), adapt_every: int = 1) -> tuple[RunResult, list[dict[str, float]]]:
    """One method on one stream, from a pristine copy of the source model; ``sinks`` see the
    per-sample outputs too (with ``adapt_every`` k > 1: the online view, adapting on every k-th
    batch only)."""
    seed_everything(seed)
    prepared = clean.get(spec.name, stream.batch_size, spec.hyperparameters) \
        if clean and uses_clean_data(spec.name) else None
    method = setup.build_method(spec.name, spec.hyperparameters, stream.batch_size, prepared, fresh_copy=True)
    method.reseed(seed)  # as tta adapt: the method's own generator, seeded just before the first batch
    recorder = CurveRecorder()
    online = f" online k={adapt_every}" if adapt_every > 1 else ""
    progress.start_run(f"{stream.name} {spec.label}{online}", len(stream.items))
    started = time.perf_counter()
    stepper: Any = EveryKth(method, adapt_every) if adapt_every > 1 else method
    totals = run_stream(stepper, batches, setup.device, [recorder, progress, *sinks],
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
        seed=seed, images_per_second=totals.images / totals.adapt_seconds if totals.adapt_seconds > 0 else None,
    )
    return result, recorder.finish()


# --- output files ----------------------------------------------------------------------------------


def prepare_out(config: BenchConfig) -> set[tuple[str, str, str, str, int]]:
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
               "fisher_size", "concentration")


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
        "streams": [{"name": s.name, "images": len(s.items), "batch_size": s.batch_size} | s.params
                    for s in streams],
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
    streams = seeded_streams(config, loaded, data)
    methods = _resolve_methods(config, console)
    clean = _clean_items(config, loaded)
    write_record(config, loaded, data, streams, device, started)
    results = _run_all(config, setup, streams, methods, CleanDataCache(setup, clean) if clean else None, done,
                       console)
    write_record(config, loaded, data, streams, device, started)
    write_report(config.out, loaded.num_classes, plots=config.plots, console=console)
    return results


def seeded_streams(config: BenchConfig, loaded: LoadedModel, data: CorruptedSet) -> list[BenchStream]:
    """The streams of every setting for every stream seed; the images (and their sample) are the
    same for every seed, only the order differs."""
    by_corruption = limit_items(data.by_corruption, config.limit, config.seed)
    levels = None
    if "gradual" in config.settings:
        found = find_levels(data.root, loaded.class_names, data.corruptions)
        levels = {level: limit_items(items, config.limit, config.seed) for level, items in found.items()}
    return [stream for seed in config.stream_seeds
            for stream in build_streams(by_corruption, config.settings, config.batch_size, seed, config.bs1_limit,
                                        config.concentration, levels)]


def source_speeds(out: Path) -> dict[tuple[str, str, str, int], float]:
    """images/s of the source runs already in results.csv, per (model, setting, corruption, seed)."""
    path = out / RESULTS
    rows = read_results(path) if path.is_file() else []
    return {(r["model"], r["setting"], r["corruption"], r.get("seed") or 0): r["images_per_second"]
            for r in rows if is_source(r["method"]) and r.get("images_per_second")}


def run_cell_method(config: BenchConfig, stream: BenchStream, spec: MethodSpec, setup: RunSetup,
                    batches: Callable[[], Iterable[Batch]], clean: CleanDataCache | None,
                    progress: BenchProgress, source_speed: float | None) -> tuple[RunResult, list[dict[str, float]]]:
    """One method on one stream, then (when slower than source) again in the online view."""
    seed = int(stream.params.get("seed", config.seed))
    result, windows = run_one(stream, spec, setup, batches(), clean, progress, seed)
    if is_source(spec.name) or source_speed is None:
        result.online_k = 1 if is_source(spec.name) else None
        result.online_accuracy = result.accuracy if is_source(spec.name) else None
        return result, windows
    result.online_k = online_k(source_speed, result.images_per_second)
    result.online_accuracy = result.accuracy
    if result.online_k > 1 and config.online:
        online, _ = run_one(stream, spec, setup, batches(), clean, progress, seed,
                            adapt_every=result.online_k)
        result.online_accuracy = online.accuracy
    elif result.online_k > 1:
        result.online_accuracy = None
    return result, windows


def _run_all(config: BenchConfig, setup: RunSetup, streams: list[BenchStream], methods: list[MethodSpec],
             clean: CleanDataCache | None, done: set[tuple[str, str, str, str, int]],
             console: Console) -> list[RunResult]:
    loaded = setup.loaded
    results: list[RunResult] = []
    speeds = source_speeds(config.out)
    # source first: every other method's online view needs its speed on the same stream.
    methods = sorted(methods, key=lambda m: not is_source(m.name))
    with BenchProgress(console, len(streams) * len(methods), config.quiet) as progress:
        for stream in streams:
            seed = int(stream.params.get("seed", config.seed))
            cell = (loaded.spec, stream.setting, stream.corruption, seed)
            todo = [m for m in methods if (*cell[:3], m.label, seed) not in done]
            progress.skip(len(methods) - len(todo))
            batches = batch_source(stream, setup, config.workers, config.cache_mb << 20,
                                   image_bytes(loaded))
            for spec in todo:
                result, windows = run_cell_method(config, stream, spec, setup, batches, clean, progress,
                                                  speeds.get(cell))
                if is_source(spec.name) and result.images_per_second:
                    speeds[cell] = result.images_per_second
                save_run(config.out, result, windows)
                progress.end_run(result)
                results.append(result)
    return results
