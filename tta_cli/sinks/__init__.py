"""Sinks: where a run's outputs go (predictions, skipped files, progress, run record, model)."""

from tta_cli.sinks.predictions import ErrorsWriter, PredictionsWriter

__all__ = ["ErrorsWriter", "PredictionsWriter"]
