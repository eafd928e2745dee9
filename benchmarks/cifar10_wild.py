#!/usr/bin/env python3
"""CIFAR-10-W: the wild settings on the shared CIFAR-10 models (docs/BENCHMARKS.md, CIFAR-10 tables).

One command per table:

    python benchmarks/cifar10_wild.py --quick    # protocol v2, quick (CIFAR-10-C severities, all methods)
    python benchmarks/cifar10_wild.py            # protocol v2, full: 10,000 test images per corruption
    python benchmarks/cifar10_wild.py --protocol v1 --quick   # the first wave's tables (ImageNet-C
                                                              # parameters; needs corrupt-tta)

Steps, each reused from the cache on a rerun (default ~/.cache/tta-cli/bench, or $TTA_BENCH_CACHE):
1. extract CIFAR-10 test (and a seeded sample of train images for EATA's Fisher) from
   ``../shared/data/cifar10-jpeg.tar.gz`` (or $TTA_SHARED) into class folders;
2. ``tta corrupt``: the 15 corruptions at severity 5 (v2: 1-5 where ``gradual`` runs), seed 0, with
   CIFAR-10-C's parameters (v2) or ImageNet-C's (v1) (a seeded sample of ``--limit`` images
   per corruption, the same images for every corruption);
3. ``tta bench`` per model (GroupNorm, LayerNorm and BatchNorm): the settings, methods and limits
   of the chosen preset, into ``OUT/<part>/`` (``--resume`` continues an interrupted run);
4. the combined tables in ``OUT/tables.md``.
"""

from __future__ import annotations

import argparse
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, cache_dir, shared_dir

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MODELS = {"gn": "cifar10-resnet18-gn", "ln": "cifar10-convnext-atto-ln", "bn": "cifar10-resnet18-bn"}
METHODS = "source,norm,tent,eata,sar,foa_shift"
"""The first wave's methods (v1), with the forward-only foa_shift; v2 runs every registered method
("all", foa_shift included)."""


@dataclass
class Part:
    """One ``tta bench`` call: a model on some settings of one corrupted set."""

    name: str
    model: str
    settings: str
    limit: int | None
    """Images per corruption written by ``tta corrupt`` (None: all 10,000)."""
    corruptions: str = "all"
    methods: str = METHODS
    bs1_limit: int | None = None
    bench_limit: int | None = None
    """Images per corruption the benchmark takes from those (a seeded sample)."""
    seeds: str = "0"
    preset: str = "imagenet"
    """v1 corrupted with ImageNet-C's parameters; v2 with CIFAR-10-C's."""

    @property
    def severities(self) -> list[int]:
        return [1, 2, 3, 4, 5] if "gradual" in self.settings else [5]


def full_parts() -> list[Part]:
    """The spec's protocol: every setting on the full test set."""
    return [Part(f"{key}", model, "mild,label-shift,mixed,bs1", None) for key, model in MODELS.items()]


QUICK_CORRUPTIONS = "gaussian_noise,defocus_blur,snow,fog,contrast"
"""One or two per ImageNet-C family (noise, blur, weather, digital) for the quick per-corruption settings."""


def quick_parts() -> list[Part]:
    """What docs/BENCHMARKS.md reports (about 45 minutes of one core of a CPU shared with others)."""
    parts = []
    for key, model in MODELS.items():
        parts.append(Part(key, model, "mild,label-shift,bs1", 1000, QUICK_CORRUPTIONS, bs1_limit=100))
        parts.append(Part(f"{key}-mixed", model, "mixed", 1000, bench_limit=333))
    # The paper's BatchNorm-at-batch-size-1 setting: BN forced to the single sample's statistics
    # (our default at B = 1 mixes them with the source statistics instead).
    parts.append(Part("bn-bs1-batchstats", MODELS["bn"], "bs1", 1000, QUICK_CORRUPTIONS, bs1_limit=100,
                      methods="norm:bn_stats=batch,tent:bn_stats=batch,sar:bn_stats=batch"))
    # The mild setting on all 15 corruptions for the GroupNorm model.
    parts.append(Part("gn-mild-all", MODELS["gn"], "mild", 1000))
    # Long streams (10,000 images, 156 updates) on the corruption the spec has reference numbers
    # (and a reported collapse) for: short streams barely move GroupNorm/LayerNorm models.
    parts.append(Part("gn-long", MODELS["gn"], "mild", None, corruptions="gaussian_noise"))
    parts.append(Part("ln-long", MODELS["ln"], "mild", None, corruptions="gaussian_noise"))
    return parts


V2_SETTINGS = "mild,bs1,label-shift,mixed,continual,correlated,mixed-correlated,gradual"


def full_parts_v2() -> list[Part]:
    """Protocol v2, full: every setting, all 15 corruptions x 10,000 images, 3 stream seeds, every
    registered method, CIFAR-10-C severities."""
    return [Part(key, model, V2_SETTINGS, None, methods="all", seeds="0,1,2", preset="cifar")
            for key, model in MODELS.items()]


def quick_parts_v2() -> list[Part]:
    """Protocol v2, quick: continual (the field's headline protocol) and correlated labels on 5
    corruptions x 200 images, 3 stream seeds, every method, each model; mild, gradual and
    mixed-correlated on the GroupNorm and LayerNorm models with one seed. See docs/BENCHMARKS.md for its time."""
    parts = [Part(key, model, "continual,correlated", 200, QUICK_CORRUPTIONS, methods="all",
                  seeds="0,1,2", preset="cifar") for key, model in MODELS.items()]
    parts.append(Part("gn-more", MODELS["gn"], "mild,gradual,mixed-correlated", 200, QUICK_CORRUPTIONS,
                      methods="all", preset="cifar"))
    parts.append(Part("ln-more", MODELS["ln"], "mild,gradual,mixed-correlated", 200, QUICK_CORRUPTIONS,
                      methods="all", preset="cifar"))
    return parts


def protocol_parts(protocol: str, quick: bool) -> list[Part]:
    if protocol == "v1":
        return quick_parts() if quick else full_parts()
    return quick_parts_v2() if quick else full_parts_v2()


def extract_cifar(tar_path: Path, cache: Path, fisher_images: int) -> tuple[Path, Path]:
    """``cache/cifar10/test/<class>/*.jpg`` (all 10,000) and ``cache/cifar10/fisher/<class>/*.jpg``
    (a seeded sample of the train split: EATA's clean images, never test images)."""
    test, fisher = cache / "cifar10" / "test", cache / "cifar10" / f"fisher-{fisher_images}"
    if (test / ".done").is_file() and (fisher / ".done").is_file():
        return test, fisher
    members: dict[str, list[tarfile.TarInfo]] = {"test": [], "train": []}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 4 and parts[1] in members and parts[2] in CLASSES:
                members[parts[1]].append(m)
        train = sorted(members["train"], key=lambda m: m.name)
        chosen = random.Random(0).sample(train, fisher_images)
        for folder, items in ((test, members["test"]), (fisher, chosen)):
            for m in items:
                _, _, cls, name = m.name.split("/")
                (folder / cls).mkdir(parents=True, exist_ok=True)
                (folder / cls / name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
            (folder / ".done").write_text("")
    return test, fisher


def corrupted(test: Path, cache: Path, corruptions: str, limit: int | None, preset: str = "imagenet",
              severities: list[int] | None = None) -> Path:
    from tta_cli.bench.corrupt import CorruptPlan, corrupt_folder, parse_corruptions

    # v1's folders (ImageNet-C parameters) keep their names, so that their caches stay valid.
    dst = cache / (f"cifar10-c-{limit or 'full'}" if preset == "imagenet" else f"cifar10-c-{preset}-{limit or 'full'}")
    names = parse_corruptions(corruptions)
    print(f"corrupting CIFAR-10 test ({limit or 'all'} per corruption, {len(names)} corruptions, "
          f"{preset} parameters) into {dst}")
    report = corrupt_folder(CorruptPlan(test, dst, names, severities or [5], seed=0, limit=limit, preset=preset))
    print(f"  {report.written} written, {report.existing} already there")
    return dst


def run_part(part: Part, args: argparse.Namespace, shared: Path, data: Path, fisher: Path) -> Path:
    from tta_cli.bench.corrupt import parse_corruptions
    from tta_cli.bench.runner import BenchConfig, parse_methods, parse_seeds, run_benchmark
    from tta_cli.bench.settings import parse_settings

    out = Path(args.out) / part.name
    config = BenchConfig(
        model=f"local-dir:{shared / 'models' / part.model}", data=data, out=out,
        methods=parse_methods(part.methods), settings=parse_settings(part.settings),
        corruptions=parse_corruptions(part.corruptions), severity=5, limit=part.bench_limit,
        bs1_limit=part.bs1_limit,
        batch_size=64, clean=fisher, fisher_size=args.fisher_size, device=args.device, seed=0,
        threads=args.threads, resume=args.resume, overwrite=not args.resume, quiet=args.quiet,
        seeds=parse_seeds(part.seeds), plots=not args.no_plots,
    )
    print(f"== {part.name}: {part.model}, {part.settings}, {part.methods}, seeds {part.seeds} -> {out}")
    run_benchmark(config)
    return out


def table_suffix(part: Part) -> str:
    """The main parts of a model (its settings and its mixed stream) share one row per method in
    the tables; the extra parts (other corruptions, stream lengths or statistics) get their own."""
    return "" if part.name.removesuffix("-mixed") in MODELS else f" ({part.name})"


def table_methods(protocol: str) -> list[str] | None:
    """The row order of the tables: v1's five methods; v2 every registered one, source first."""
    if protocol == "v1":
        return METHODS.split(",")
    from tta_cli.bench.runner import all_methods

    return all_methods()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick version (limits; see docs/BENCHMARKS.md)")
    ap.add_argument("--protocol", choices=("v1", "v2"), default="v2",
                    help="v2: CIFAR-10-C severities, the new settings, seeds, every method (default); "
                         "v1: the first wave's tables")
    ap.add_argument("--methods", default=None, help="override the methods of every part (smoke tests)")
    ap.add_argument("--seeds", default=None, help="override the stream seeds of every part, e.g. 0")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated part names (e.g. gn,ln)")
    ap.add_argument("--out", default=None, help="default runs/bench/cifar10-wild (v1) or cifar10-wild-v2")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--fisher-size", type=int, default=None,
                    help="clean train images for EATA's Fisher (default 2000, quick: 500)")
    ap.add_argument("--limit", type=int, default=None, help="override the images per corruption (smoke tests)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (docs: 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true", help="keep finished runs in OUT")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    default_out = "cifar10-wild" if args.protocol == "v1" else "cifar10-wild-v2"
    args.out = args.out or str(REPO / "runs" / "bench" / default_out)

    from tta_cli.bench.report import markdown, read_csv

    shared, cache = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz"), cache_dir(args.cache)
    parts = protocol_parts(args.protocol, args.quick)
    args.fisher_size = args.fisher_size or (500 if args.quick else 2000)
    if args.only:
        parts = [p for p in parts if p.name in args.only.split(",")]
    for part in parts:
        if args.limit:  # a smoke test: fewer images everywhere
            part.limit = args.limit
            part.bench_limit = min(part.bench_limit, args.limit) if part.bench_limit else None
        part.methods = args.methods or part.methods
        part.seeds = args.seeds or part.seeds
    test, fisher = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, args.fisher_size)
    for part in parts:
        corruptions = part.corruptions if part.preset == "cifar" or not part.limit else "all"
        data = corrupted(test, cache, corruptions, part.limit, part.preset, part.severities)
        run_part(part, args, shared, data, fisher)
    # The tables cover every part of the preset that has results (also those of earlier calls).
    everything = protocol_parts(args.protocol, args.quick)
    rows = [row | {"model": row["model"] + table_suffix(part)}
            for part in everything for row in read_csv(Path(args.out) / part.name / "results.csv")]
    (Path(args.out) / "tables.md").write_text(markdown(rows, table_methods(args.protocol)))
    print(f"tables: {Path(args.out) / 'tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
