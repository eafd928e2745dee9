"""The run record, ``run.json``: what a run was (configuration, versions, model, method) and what it
did (counts, accuracy, timing); written atomically at the start and at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tta_cli import distributed
from tta_cli.atomic import atomic_write_text
from tta_cli.config import AdaptConfig
from tta_cli.methods import Method
from tta_cli.models import LoadedModel
from tta_cli.outputs import Totals
from tta_cli.runtime import versions
from tta_cli.sinks.export_folder import ExportFolder


def run_record(config: AdaptConfig, loaded: LoadedModel, method: Method, totals: Totals,
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
            "non_finite_updates": method.non_finite_updates,
            "referenced": totals.referenced,
        },
        "resets_at_batch": list(method.resets),
        "accuracy": totals.accuracy,
        "timing": {
            "seconds": elapsed,
            "adapt_seconds": totals.adapt_seconds,
            "reference_seconds": totals.reference_seconds,
            "images_per_second": totals.images / elapsed if elapsed > 0 else 0.0,
            "data_wait_seconds": totals.data_wait_seconds,
            "batches_waiting_for_data": totals.data_waits,
            "cpu_threads_from_batch": totals.cpu_threads,
            "device_idle_share": totals.device_idle_share,
        },
        "out": str(out),
        "world_size": distributed.world_size(),
    }


def write_record(out: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out / "run.json", json.dumps(record, indent=2))


def export_folder_record(export: ExportFolder) -> dict[str, Any]:
    return {"directory": str(export.directory), "mode": export.mode, "min_confidence": export.min_confidence,
            "files": export.stats.files, "uncertain": export.stats.uncertain,
            "copied_instead_of_linked": export.stats.copied_instead_of_linked,
            "failed": [{"path": key, "reason": reason} for key, reason in export.failed]}
