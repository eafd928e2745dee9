"""Reusable ``Annotated`` option aliases, shared by the commands, and their value checks.

Every value is checked while the command line is parsed, before any output exists: a bad one is a
click usage error (``Invalid value for '--lr': ...``), exit code 2. Integers go through
:func:`whole`, floats through :func:`finite` (click's ranges let ``nan`` and ``inf`` through, and
typer prints its ranges as ``<int range> [x>=1]`` in the help), fixed choices through :func:`one_of`.

Every option names a plain metavar (``N``, ``DIR``, ``NAME``; typer's default is its internal type,
``<str>``) and a help panel (:data:`PANELS`), so that ``--help`` groups the options by what they
are about.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from tta_cli.choices import CHANNELS_LAST, EXPORT_BN, EXPORT_MODES, LABELS_FROM_FOLDERS, PRECISIONS, PREDICTION_FORMATS

MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit

MODEL, INPUT, METHOD, OUTPUT, SPEED, RUN = "Model", "Input", "Method", "Output", "Speed", "Run control"
PANELS = (MODEL, INPUT, METHOD, OUTPUT, SPEED, RUN)
"""The help panels, in the order ``--help`` shows them."""


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


def whole(minimum: int, maximum: int | None = None) -> Callable[[int | None], int | None]:
    """A callback accepting integers from ``minimum`` to ``maximum`` (no upper bound: None), or None."""

    def check(value: int | None) -> int | None:
        if value is None:
            return None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise typer.BadParameter(f"must be an integer {bound}, got {value}")
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


# --- model ----------------------------------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", metavar="NAME", rich_help_panel=MODEL, show_default=False,
    help="timm model: a registry name or alias (vit_base, resnet50_gn, resnet50; see tta models), "
         "hf-hub:ORG/NAME, or local-dir:DIR (a timm folder, e.g. the model/ a run exported).",
)]
PretrainedOpt = Annotated[bool, typer.Option(
    "--pretrained/--no-pretrained", rich_help_panel=MODEL,
    help="Load the pretrained weights (from the Hugging Face cache or hub).",
)]
CheckpointOpt = Annotated[Path | None, typer.Option(
    "--checkpoint", metavar="FILE", rich_help_panel=MODEL,
    help="Weights for the --model architecture: .safetensors, .pth, .pt or .bin.",
)]
NumClassesOpt = Annotated[int | None, typer.Option(
    "--num-classes", metavar="N", rich_help_panel=MODEL, callback=whole(1, 1_000_000),
    help="Classifier size, where it differs from the pretrained head.",
)]

# --- input ----------------------------------------------------------------------------------------

InputsArg = Annotated[list[Path], typer.Argument(
    metavar="INPUTS", show_default=False,
    help="Image folders, images, videos (.mp4 .mkv .avi .mov .webm) or .txt/.csv lists, in order.")]
LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", metavar="FILE", rich_help_panel=INPUT,
    help="CSV with columns file,label (class index, id or name) for a flat folder: live accuracy.")]
LabelsEncodingOpt = Annotated[str, typer.Option(
    "--labels-encoding", metavar="CODEC", rich_help_panel=INPUT, callback=text_encoding,
    help="Text encoding of --labels and of .txt/.csv lists (e.g. latin-1, cp1252).",
)]
LabelsFromFoldersOpt = Annotated[str, typer.Option(
    "--labels-from-folders", metavar="MODE", rich_help_panel=INPUT, callback=one_of(*LABELS_FROM_FOLDERS),
    help="Labels from first-level sub-folders: auto (when each is named like a class), names (the "
         "same, else an error), index (folders 0, 1, ...) or off.",
)]
ShuffleOpt = Annotated[bool, typer.Option(
    "--shuffle", rich_help_panel=INPUT,
    help="Shuffle the whole stream (all inputs together) with --seed.",
)]
EveryOpt = Annotated[int | None, typer.Option(
    "--every", metavar="N", rich_help_panel=INPUT, callback=whole(1), help="Videos: keep every N-th frame.",
)]
FpsOpt = Annotated[float | None, typer.Option(
    "--fps", metavar="F", rich_help_panel=INPUT, callback=finite(0, inclusive=False),
    help="Videos: at most F frames per second (never repeats a frame).",
)]
StartOpt = Annotated[float, typer.Option(
    "--start", metavar="S", rich_help_panel=INPUT, callback=finite(0),
    help="Videos: skip the frames before S seconds.",
)]
EndOpt = Annotated[float | None, typer.Option(
    "--end", metavar="S", rich_help_panel=INPUT, callback=finite(0, inclusive=False),
    help="Videos: stop at S seconds.",
)]
MaxFramesOpt = Annotated[int | None, typer.Option(
    "--max-frames", metavar="N", rich_help_panel=INPUT, callback=whole(1),
    help="Videos: at most N frames from each video.",
)]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", metavar="N", rich_help_panel=INPUT, callback=whole(0),
    help="Skip images with more pixels (decompression bombs); 0: no limit.",
)]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", rich_help_panel=INPUT, help="Exit 3 if any input could not be read (default: skip it).")]

# --- method ---------------------------------------------------------------------------------------

MethodOpt = Annotated[str, typer.Option(
    "--method", metavar="NAME", rich_help_panel=METHOD,
    help="Adaptation method; auto picks one from the model and batch size (see tta methods).",
)]
LrOpt = Annotated[float | None, typer.Option(
    "--lr", metavar="LR", rich_help_panel=METHOD, callback=finite(0, inclusive=False),
    help="Learning rate (default: the SAR paper's rule by model family and batch size).",
)]
SeedOpt = Annotated[int, typer.Option(
    "--seed", metavar="N", rich_help_panel=RUN, callback=whole(0, MAX_SEED),
    help="Random seed (0 to 2^32-1).")]

# --- output ---------------------------------------------------------------------------------------

OutOpt = Annotated[Path | None, typer.Option(
    "--out", "-o", metavar="DIR", rich_help_panel=OUTPUT, show_default=False,
    help="Output folder (default: runs/DATE-TIME-METHOD).",
)]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", rich_help_panel=OUTPUT, help="Write into a non-empty output folder.")]
FormatOpt = Annotated[str, typer.Option(
    "--format", metavar="FORMAT", rich_help_panel=OUTPUT, callback=one_of(*PREDICTION_FORMATS),
    help="csv (predictions.csv) or jsonl (predictions.jsonl, one JSON object per row).")]
ExportFolderOpt = Annotated[Path | None, typer.Option(
    "--export-folder", metavar="DIR", rich_help_panel=OUTPUT,
    help="Also file every image under DIR/<predicted class>/ (with manifest.csv).")]
ExportModeOpt = Annotated[str, typer.Option(
    "--export-mode", metavar="MODE", rich_help_panel=OUTPUT, callback=one_of(*EXPORT_MODES),
    help="hardlink (a copy where a link is impossible), symlink or copy.")]
MinConfidenceOpt = Annotated[float | None, typer.Option(
    "--min-confidence", metavar="P", rich_help_panel=OUTPUT, callback=finite(0),
    help="File predictions less confident than P (0 to 1) under DIR/_uncertain/.")]
ExportBnOpt = Annotated[str, typer.Option(
    "--export-bn", metavar="STATS", rich_help_panel=OUTPUT, callback=one_of(*EXPORT_BN),
    help="BatchNorm statistics of the exported model/ where the run normalised with test batches: "
         "stream (those the run used) or source.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", rich_help_panel=OUTPUT, help="No progress line and no summary.")]
JsonOpt = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help="Print JSON.")]
SummaryJsonOpt = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT, help="Print the final summary as one JSON object on stdout.")]

# --- speed ----------------------------------------------------------------------------------------

BatchSizeOpt = Annotated[int, typer.Option(
    "--batch-size", "-b", metavar="N", rich_help_panel=SPEED, callback=whole(1),
    help="Images per batch (1 works; methods adapt once per batch).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="DEVICE", rich_help_panel=SPEED, help="auto, cpu, cuda, cuda:N or mps.")]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", metavar="N", rich_help_panel=SPEED, callback=whole(0),
    help="Decoding processes (default: from the CPU count; 0: decode in line).",
)]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", metavar="DTYPE", rich_help_panel=SPEED, callback=one_of(*PRECISIONS),
    help="auto (bf16 where measured to keep results, else fp32), fp32, bf16 or fp16 autocast; "
         "losses and adapted parameters stay fp32.",
)]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", rich_help_panel=SPEED, help="torch.compile the model (slow first batches; GPU mostly).",
)]
ChannelsLastOpt = Annotated[str, typer.Option(
    "--channels-last", metavar="MODE", rich_help_panel=SPEED, callback=one_of(*CHANNELS_LAST),
    help="Channels-last memory format: auto (conv nets on CUDA), on or off.",
)]
