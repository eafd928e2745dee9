"""``tta adapt`` as a library call: model, stream, method, engine and sinks wired together."""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tta_cli import __version__
from tta_cli.config import AdaptConfig, default_workers
from tta_cli.engine import Totals, resolve_device, run_stream
from tta_cli.errors import TTAError
from tta_cli.methods import create_method, method_config
from tta_cli.methods.base import TTAMethod
from tta_cli.models import LoadedModel, export_model, load_model
from tta_cli.sinks.predictions import ErrorsWriter, PredictionsWriter
from tta_cli.sinks.progress import ProgressDisplay, summary_table
from tta_cli.sources.folder import folder_items
from tta_cli.sources.items import StreamItem
from tta_cli.sources.loader import iter_batches


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless ``overwrite``; check it can be written before any work."""
    if out.exists() and not out.is_dir():
        raise TTAError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TTAError(f"output folder {out} is not empty", "choose another --out or pass --overwrite")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".tta-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TTAError(f"cannot write to output folder {out}: {err.strerror}", "choose another --out") from err


def stream_items(config: AdaptConfig, class_names: list[str]) -> list[StreamItem]:
    items: list[StreamItem] = []
    for path in config.inputs:
        items += folder_items(path, class_names, config.labels)
    return items


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the core
        pass


def _build_method(config: AdaptConfig, loaded: LoadedModel, device: torch.device, console: Console) -> TTAMethod:
    name = config.method.lower()
    if name == "eata" and config.clean is None:
        console.print("[yellow]eata without --clean: no Fisher regulariser, running eta[/yellow]")
        name = "eta"
    method_cfg = method_config(name, **config.settings)
    loaded.model.to(device)
    method = create_method(name, loaded.model, method_cfg, batch_size=config.batch_size)
    if name == "eata" and config.clean is not None:
        clean = folder_items(config.clean, loaded.class_names)
        batches = iter_batches(clean, loaded.transform(), config.batch_size, workers=0)
        n = method.compute_fisher(b.images.to(device) for b in batches if b.items)
        if not config.quiet:
            console.print(f"Fisher information from {n} clean images in {config.clean}")
    return method


def _versions() -> dict[str, str]:
    import timm

    return {"tta": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def adapt(config: AdaptConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one adaptation over the stream; write predictions, the adapted model and run.json."""
    console = console or Console(stderr=True)
    if config.batch_size < 1:
        raise TTAError("--batch-size must be at least 1")
    out = config.out_dir()
    if out.is_dir() and any(out.iterdir()) and not config.overwrite:
        raise TTAError(f"output folder {out} is not empty", "choose another --out or pass --overwrite")
    device = resolve_device(config.device)
    seed_everything(config.seed)
    loaded = load_model(config.model, config.pretrained, config.checkpoint, config.num_classes)
    items = stream_items(config, loaded.class_names)
    method = _build_method(config, loaded, device, console)
    prepare_out_dir(out, config.overwrite)
    if not config.quiet:
        _print_plan(console, loaded, method, len(items), device)

    workers = default_workers() if config.workers is None else config.workers
    predictions = PredictionsWriter(out / "predictions.csv", loaded.class_names)
    errors = ErrorsWriter(out / "errors.csv")
    started = time.perf_counter()
    status = "completed"
    totals = Totals()
    progress = ProgressDisplay(console, len(items), method, quiet=config.quiet)
    try:
        batches = iter_batches(items, loaded.transform(), config.batch_size, workers,
                               pin_memory=device.type == "cuda")
        with progress:
            totals = run_stream(method, batches, device, [predictions, errors, progress])
    except KeyboardInterrupt:
        status = "interrupted"
        totals = progress.totals
    finally:
        predictions.close()
        errors.close()
    elapsed = time.perf_counter() - started
    export_model(loaded, method.adapted_state_dict(), out / "model")
    record = _record(config, loaded, method, totals, device, out, status, elapsed, len(items))
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
        if config.strict:
            raise TTAError(f"{totals.skipped} inputs could not be read (--strict)", exit_code=3)
    return record


def _print_plan(console: Console, loaded: LoadedModel, method: TTAMethod, n: int, device: torch.device) -> None:
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
    console.print(f"[bold]stream[/bold] {n} images on {device}")


def _record(config: AdaptConfig, loaded: LoadedModel, method: TTAMethod, totals: Totals,
            device: torch.device, out: Path, status: str, elapsed: float, n_items: int) -> dict[str, Any]:
    info = method.describe()
    return {
        "status": status,
        "config": config.to_record(),
        "versions": _versions(),
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
        },
        "out": str(out),
    }
