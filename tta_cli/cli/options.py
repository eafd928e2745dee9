"""Reusable ``Annotated`` option aliases, shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    "--num-classes", min=1, help="Classifier size, when it differs from the pretrained head.",
)]
MethodOpt = Annotated[str, typer.Option(
    "--method", help="Adaptation method (see `tta methods`).",
)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch (1 works).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
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
    "--fps", help="Videos: keep at most F frames per second (resampled in time; never repeats a frame).",
)]
StartOpt = Annotated[float, typer.Option(
    "--start", min=0.0, help="Videos: skip frames before this time (s).",
)]
EndOpt = Annotated[float | None, typer.Option("--end", help="Videos: stop at this time (s).")]
MaxFramesOpt = Annotated[int | None, typer.Option(
    "--max-frames", min=1, help="Videos: at most N frames from each video.",
)]
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=0, help="Skip images with more pixels (decompression bombs); 0: no limit.",
)]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="fp32, bf16 or fp16: autocast for the forwards (fp16 with loss scaling); "
                        "losses, predictions and adapted parameters stay fp32.",
)]
CompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the model (slow first batches, faster after; GPU mostly).",
)]
ChannelsLastOpt = Annotated[str, typer.Option(
    "--channels-last", help="Channels-last memory format: auto (conv nets on CUDA), on or off.",
)]
