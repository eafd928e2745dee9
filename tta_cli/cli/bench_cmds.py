"""``tta corrupt`` and ``tta bench``: the wild-setting benchmark commands.

Like every command, they import the library (torch, corrupt-tta, matplotlib) only when they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tta_cli.cli.adapt_cmds import print_summary
from tta_cli.cli.options import (
    INPUT,
    METHOD,
    OUTPUT,
    RUN,
    SPEED,
    CheckpointOpt,
    DeviceOpt,
    ModelOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    SeedOpt,
    SummaryJsonOpt,
    finite,
    whole,
)

LimitOpt = Annotated[int | None, typer.Option(
    "--limit", metavar="N", rich_help_panel=INPUT, callback=whole(1),
    help="At most N images per corruption (a seeded sample, the same images for each).")]


def corrupt(
    src: Annotated[Path, typer.Argument(
        metavar="SRC", show_default=False, help="Class-foldered image set: SRC/<class>/<image>.")],
    dst: Annotated[Path, typer.Argument(
        metavar="DST", show_default=False, help="Output: DST/<corruption>/<severity>/<class>/<image>.png.")],
    limit: LimitOpt = None,
    crop: Annotated[int | None, typer.Option(
        "--crop", metavar="N", rich_help_panel=INPUT, callback=whole(2),
        help="Centre-crop to N x N first (224 for ImageNet, as ImageNet-C).")] = None,
    corruption: Annotated[list[str], typer.Option(
        "--corruption", "-c", metavar="NAME", rich_help_panel=METHOD,
        help="all (the 15 ImageNet-C test corruptions), held-out (the 4 others), clean, or names; "
             "comma-separated or repeated.")] = ["all"],  # noqa: B006
    severity: Annotated[str, typer.Option(
        "--severity", "-s", metavar="S", rich_help_panel=METHOD,
        help="Severity 1 to 5, a list (3,5) or a range (1-5).")] = "5",
    preset: Annotated[str, typer.Option(
        "--preset", metavar="NAME", rich_help_panel=METHOD,
        help="Corruption parameters: cifar (CIFAR-10-C's, small images), imagenet (ImageNet-C's, "
             "with corrupt-tta) or auto (cifar up to 64 px).")] = "auto",
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
    seed: SeedOpt = 0,
) -> None:
    """Write corrupted copies of the images in SRC into DST, the same for a seed.

    CIFAR-10-C's severities for small images, ImageNet-C's (corrupt-tta) for large ones (--preset).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tta_cli.bench.corrupt import (
        CorruptPlan,
        check_destination,
        corrupt_folder,
        import_corrupt_tta,
        list_class_images,
        parse_corruptions,
        parse_preset,
        parse_severities,
        select_images,
    )

    plan = CorruptPlan(src, dst, parse_corruptions(corruption), parse_severities(severity), seed, limit, crop,
                       parse_preset(preset))
    if plan.concrete_preset() == "imagenet":
        import_corrupt_tta()  # fail before any work when the extra is missing
    total = len(select_images(list_class_images(src), limit, seed))
    check_destination(plan, overwrite)  # a wrong destination fails before the progress bar shows
    console = Console(stderr=True)
    progress = Progress(TextColumn("[bold]corrupt"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, disable=quiet)
    task = progress.add_task("corrupt", total=total)
    with progress:
        report = corrupt_folder(plan, overwrite, on_image=lambda: progress.advance(task))
    if report.failed:
        console.print(f"[yellow]warning: {len(report.failed)} images could not be read "
                      f"(e.g. {report.failed[0][0]}: {report.failed[0][1]})[/yellow]")
    if not quiet:
        console.print(f"{report.images} images x {len(plan.corruptions)} corruptions x "
                      f"{len(plan.severities)} severities: {report.written} written, "
                      f"{report.existing} already there, in {dst} ({plan.preset} parameters)")
    print_summary({"destination": str(dst), "preset": plan.preset, "corruptions": list(plan.corruptions),
                   "severities": list(plan.severities), "images": report.images, "written": report.written,
                   "existing": report.existing,
                   "failed": [{"path": key, "reason": reason} for key, reason in report.failed]}, as_json)


def bench(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(
        "--data", metavar="DIR", rich_help_panel=INPUT, show_default=False,
        help="Corrupted set (tta corrupt's layout, or a flat folder whose labels.csv has a corruption "
             "column), or a clean class-foldered set to corrupt into OUT/data first.")],
    checkpoint: CheckpointOpt = None,
    corruptions: Annotated[str | None, typer.Option(
        "--corruptions", metavar="NAMES", rich_help_panel=INPUT,
        help="Corruptions to run (default: the 15 test ones found in --data).")] = None,
    severity: Annotated[int, typer.Option(
        "--severity", "-s", metavar="S", rich_help_panel=INPUT, callback=whole(1, 5),
        help="Severity 1 to 5.")] = 5,
    limit: LimitOpt = None,
    bs1_limit: Annotated[int | None, typer.Option(
        "--bs1-limit", metavar="N", rich_help_panel=INPUT, callback=whole(1),
        help="Only the first N images of each batch-size-1 stream (slow).")] = None,
    methods: Annotated[str, typer.Option(
        "--methods", metavar="NAMES", rich_help_panel=METHOD,
        help="Comma-separated methods, or all; method:key=value sets a hyperparameter "
             "(e.g. norm:bn_stats=batch).")] = "all",
    settings: Annotated[str, typer.Option(
        "--settings", metavar="NAMES", rich_help_panel=METHOD,
        help="Comma-separated: mild, mixed, bs1, label-shift, label-shift-all, continual, correlated, "
             "mixed-correlated, gradual.")] = "mild,mixed,bs1,label-shift",
    seeds: Annotated[str | None, typer.Option(
        "--seeds", metavar="LIST", rich_help_panel=METHOD,
        help="Stream seeds, e.g. 0,1,2: each cell once per seed, mean and standard deviation "
             "(default: --seed).")] = None,
    concentration: Annotated[float, typer.Option(
        "--concentration", metavar="C", rich_help_panel=METHOD, callback=finite(1e-6),
        help="Dirichlet concentration of the correlated settings (small: long single-class runs).")] = 0.1,
    online: Annotated[bool, typer.Option(
        "--online/--no-online", rich_help_panel=METHOD,
        help="Re-run methods slower than source adapting on every k-th batch (Alfarra et al. 2024).")] = True,
    clean: Annotated[Path | None, typer.Option(
        "--clean", metavar="DIR", rich_help_panel=METHOD,
        help="Clean in-distribution images for EATA's Fisher (else eata runs as eta).")] = None,
    fisher_size: Annotated[int, typer.Option(
        "--fisher-size", metavar="N", rich_help_panel=METHOD, callback=whole(1),
        help="At most N clean images for the Fisher (the paper: 2000).")] = 2000,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    plots: Annotated[bool, typer.Option(
        "--plots/--no-plots", rich_help_panel=OUTPUT,
        help="Write PNG plots (needs matplotlib).")] = True,
    quiet: QuietOpt = False,
    as_json: SummaryJsonOpt = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", metavar="N", rich_help_panel=SPEED, callback=whole(1),
        help="Batch size (bs1 uses 1).")] = 64,
    device: DeviceOpt = "auto",
    threads: Annotated[int | None, typer.Option(
        "--threads", metavar="N", rich_help_panel=SPEED, callback=whole(1),
        help="torch CPU threads (default: chosen by timing steps, or OMP_NUM_THREADS).")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", metavar="N", rich_help_panel=SPEED, callback=whole(0),
        help="Decoding processes.")] = 0,
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option(
        "--resume", rich_help_panel=RUN, help="Keep the runs already in OUT and run the rest.")] = False,
) -> None:
    """Run each method on each wild setting, a fresh source model per run; write results to --out.

    Writes results.csv (one row per run), curves.csv, results.md, accuracy.png and curves/*.png.
    """
    from datetime import datetime

    from tta_cli.bench.corrupt import parse_corruptions
    from tta_cli.bench.runner import BenchConfig, parse_methods, parse_seeds, run_benchmark
    from tta_cli.bench.settings import parse_settings

    config = BenchConfig(
        model=model, data=data,
        out=out or Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-bench",
        methods=parse_methods(methods), settings=parse_settings(settings),
        corruptions=parse_corruptions(corruptions) if corruptions else None, severity=severity, limit=limit,
        bs1_limit=bs1_limit, batch_size=batch_size, clean=clean, fisher_size=fisher_size, device=device,
        seed=seed, workers=workers, threads=threads, checkpoint=checkpoint, resume=resume,
        overwrite=overwrite, plots=plots, quiet=quiet,
        seeds=parse_seeds(seeds) if seeds else None, concentration=concentration, online=online,
    )
    import dataclasses

    results = run_benchmark(config)
    if as_json:
        print_summary({"out": str(config.out), "results": [dataclasses.asdict(r) for r in results]}, True)
    elif not quiet:
        typer.echo(f"results: {config.out / 'results.csv'}, {config.out / 'results.md'}")
