"""The fixed choices of the run's options, in one torch-free place: the command line checks them
(``tta_cli.cli.options``) and the library checks the same tuples (``tta_cli.run``, the sinks)."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""``--precision``; ``auto`` picks per device (``tta_cli.methods.precision``)."""
CHANNELS_LAST = ("auto", "on", "off")
LABELS_FROM_FOLDERS = ("auto", "names", "index", "off")
EXPORT_MODES = ("hardlink", "symlink", "copy")
"""``--export-mode``: how ``--export-folder`` files an image (``tta_cli.sinks.export_folder``)."""
EXPORT_BN = ("stream", "source")
"""``--export-bn``: the BatchNorm statistics the exported model keeps (``tta_cli.sinks.model_export``)."""
PREDICTION_FORMATS = ("csv", "jsonl")
ON_COLLAPSE = ("reset", "stop", "warn")
"""``--on-collapse``: what a label-free collapse event does (``tta_cli.monitor``)."""
SOURCE_REFERENCE = ("sampled", "all", "off")
"""``--source-reference``: which images the frozen source copy predicts (``tta_cli.reference``)."""
