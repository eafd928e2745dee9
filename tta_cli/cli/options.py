"""Reusable ``Annotated`` option aliases, shared by the commands, and their value checks.

Every value is checked while the command line is parsed, before any output exists: a bad one is a
click usage error (``Invalid value for '--lr': ...``), exit code 2. Ranges of integers use typer's
``min``/``max``; floats go through :func:`finite`, because click's ranges let ``nan`` and ``inf``
through; fixed choices go through :func:`one_of` (plain strings on the command line).
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""As ``tta_cli.methods.base.PRECISIONS`` (not imported: that module imports torch)."""
CHANNELS_LAST = ("auto", "on", "off")
LABELS_FROM_FOLDERS = ("auto", "names", "index", "off")
EXPORT_MODES = ("hardlink", "symlink", "copy")
"""As ``tta_cli.sinks.export_folder.EXPORT_MODES``."""
EXPORT_BN = ("stream", "source")
PREDICTION_FORMATS = ("csv", "jsonl")
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def finite(minimum: float, *, inclusive: bool = True) -> Callable[[float | None], float | None]:
    """A callback accepting finite numbers >= ``minimum`` (> with ``inclusive=False``), or None."""
    relation = ">=" if inclusive else ">"

    def check(value: float | None) -> float | None:
        if value is None:
            return None
        in_range = value >= minimum if inclusive else value > minimum
        if not (math.isfinite(value) and in_range):
            raise typer.BadParameter(f"must be a finite number {relation} {minimum:g}, got {value:g}")
        return value

    return check


def one_of(*choices: str) -> Callable[[str | None], str | None]:
    """A callback accepting one of ``choices`` (case-insensitive; returned in lower case), or None."""

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        if value.lower() not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return value.lower()

    return check


def text_encoding(value: str) -> str:
    """A Python codec name (UTF-8 files are read with a byte-order mark skipped)."""
    try:
        return codecs.lookup(value).name
    except LookupError:
        raise typer.BadParameter(f"unknown encoding {value!r} (e.g. utf-8, latin-1, cp1252)") from None


ModelOpt = Annotated[str, typer.Option(
    "--model", "-m",
    help="timm model: registry name (or alias vit_base, resnet50_gn, resnet50), hf-hub:org/name, "
         "or local-dir:FOLDER.",
)]
PretrainedOpt = Annotated[bool, typer.Option(
    "--pretrained/--no-pretrained", help="Load pretrained weights (from the Hugging Face cache or hub).",
)]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", help="Weights file for the --model architecture: .safetensors, .pth, .pt or .bin.",
)]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", min=1, max=1_000_000, help="Classifier size, when it differs from the pretrained head.",
)]
MethodOpt = Annotated[str, typer.Option(
    "--method", help="Adaptation method (see `tta methods`).",
)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch (1 works).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED, help="Random seed (0 .. 2**32-1).")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=0, help="Decoding worker processes (default: from the CPU count; 0 decodes inline).",
)]
OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Output folder (default runs/<date-time>-<method>).",
)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty output folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display or summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
ShuffleOpt = Annotated[bool, typer.Option(
    "--shuffle", help="Shuffle the whole stream (all inputs together) with --seed: a mixed-shift stream.",
)]
EveryOpt = Annotated[int | None, typer.Option(
    "--every", min=1, help="Videos: keep every N-th frame.",
)]
FpsOpt = Annotated[float | None, typer.Option(
    "--fps", callback=finite(0, inclusive=False),
    help="Videos: keep at most F frames per second (resampled in time; never repeats a frame).",
)]
StartOpt = Annotated[float, typer.Option(
    "--start", callback=finite(0), help="Videos: skip frames before this time (s).",
)]
EndOpt = Annotated[float | None, typer.Option(
    "--end", callback=finite(0, inclusive=False), help="Videos: stop at this time (s).",
)]
MaxFramesOpt = Annotated[int | None, typer.Option(
    "--max-frames", min=1, help="Videos: at most N frames from each video.",
)]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=0, help="Skip images with more pixels (decompression bombs); 0: no limit.",
)]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", callback=one_of(*PRECISIONS),
    help="auto (bf16 where the hardware has bf16 units and it was measured to keep results, else fp32), "
         "fp32, bf16 or fp16: autocast for the forwards (fp16 with loss scaling); "
         "losses, predictions and adapted parameters stay fp32.",
)]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the model (slow first batches, faster after; GPU mostly).",
)]
ChannelsLastOpt = Annotated[str, typer.Option(
    "--channels-last", callback=one_of(*CHANNELS_LAST),
    help="Channels-last memory format: auto (conv nets on CUDA), on or off.",
)]
LrOpt = Annotated[float | None, typer.Option(
    "--lr", callback=finite(0, inclusive=False),
    help="Learning rate (default: the SAR paper's rule by model family and batch size).",
)]
LabelsEncodingOpt = Annotated[str, typer.Option(
    "--labels-encoding", callback=text_encoding,
    help="Text encoding of the --labels CSV and of .txt/.csv lists (utf-8 skips a byte-order mark; "
         "e.g. latin-1, cp1252).",
)]
LabelsFromFoldersOpt = Annotated[str, typer.Option(
    "--labels-from-folders", callback=one_of(*LABELS_FROM_FOLDERS),
    help="Labels from first-level sub-folders: auto (when every folder is named like a class of the "
         "model), names (the same, an error otherwise), index (folders named 0, 1, ... are class "
         "indices) or off.",
)]
InputsArg = Annotated[list[Path], typer.Argument(
    help="Image folders, images, videos (.mp4 .mkv .avi .mov .webm) or .txt/.csv lists, in order.")]
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="CSV with columns file,label (class index, id or name) for a flat folder.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit non-zero if any input was skipped.")]
ExportFolderOpt = Annotated[Path | None, typer.Option(
    "--export-folder", help="Also write every image into DIR/<predicted class>/ (with manifest.csv).")]
ExportModeOpt = Annotated[str, typer.Option(
    "--export-mode", callback=one_of(*EXPORT_MODES),
    help="hardlink (a copy where a link is impossible), symlink or copy.")]
MinConfidenceOpt = Annotated[float | None, typer.Option(
    "--min-confidence", callback=finite(0),
    help="Export predictions below this confidence (0..1) to DIR/_uncertain/.")]
ExportBnOpt = Annotated[str, typer.Option(
    "--export-bn", callback=one_of(*EXPORT_BN),
    help="BatchNorm running statistics of the exported model/ where the run used test-batch "
         "statistics: stream (an EMA over the late stream, as the run normalised) or source.")]
FormatOpt = Annotated[str, typer.Option(
    "--format", callback=one_of(*PREDICTION_FORMATS),
    help="predictions.csv or predictions.jsonl (one JSON object per row, same fields).")]
SummaryJsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the final summary (run.json's record) as one JSON object on stdout.")]

