"""auto on EfficientNet-Lite0 (1,000 classes, BatchNorm): short ImageNet streams, variants side by side.

The streams of docs/BENCHMARKS.md, "the stream statistics' prior in images of the stream": the
verdict benchmark's Lite0 streams (``benchmarks/verdict.py``: 256 crops of the ImageNet sample,
ImageNet-C severity 5) and held-out ones (8 corruptions no verdict stream uses, stream seed 3, and
the 1,000 clean crops). Each variant runs on the same decoded batches; the table gives the change
against the source in points. About 25 minutes on 2 CPU cores for two variants::

    python benchmarks/auto_lite0.py --variants "auto,auto:bn_stream_prior_images=32000"
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from _common import cache_dir, shared_dir

HELD_OUT = ("motion_blur", "zoom_blur", "snow", "frost", "elastic_transform", "impulse_noise", "speckle_noise",
            "saturate")


def verdict_cells() -> list[tuple[str, str, int, int]]:
    """(data, order, batch size, seed) of the verdict benchmark's Lite0 streams."""
    cells = [(f"inet/{d}", "shuffled", 16, 1) for d in ("clean", "gaussian_noise", "fog", "contrast", "mixed")]
    cells += [("inet/mixed", "classes", 16, 1)]
    cells += [(f"inet/{d}", "shuffled", 32, 2)
              for d in ("defocus_blur", "brightness", "jpeg_compression", "shot_noise", "pixelate", "mixed")]
    return [*cells, ("inet/mixed", "classes", 32, 2)]


def held_out_streams(setup, cache: Path, shared: Path) -> list[tuple[str, list, int]]:
    """(name, items, batch size) of the held-out streams."""
    from imagenet_wild import corrupted, extract_sample

    from tta_cli.bench.settings import class_by_class, class_order
    from tta_cli.sources.folder import folder_items

    sample, _ = extract_sample(shared / "data" / "imagenet-sample-256.tar.gz", cache)
    root = corrupted(sample, cache, ",".join(HELD_OUT), 256)
    names = setup.loaded.class_names
    by_name = {c: folder_items(root / c / "5", names) for c in HELD_OUT}
    streams = []
    for c in HELD_OUT:
        items = list(by_name[c])
        random.Random(f"3/{c}").shuffle(items)
        streams.append((f"{c}, shuffled, B = 16", items, 16))
    rng = random.Random("3/mixed")
    classes = set(rng.sample(sorted({item.label for item in by_name[HELD_OUT[0]]}), 32))
    mix = [item for c in HELD_OUT for item in by_name[c] if item.label in classes]
    rng.shuffle(mix)
    streams.append(("mix of the 8, shuffled, B = 32", mix, 32))
    streams.append(("mix of the 8, class by class, B = 32", class_by_class(mix, class_order(mix, 3)), 32))
    clean = folder_items(corrupted(sample, cache, "clean", None) / "clean" / "5", names)
    random.Random("3/clean").shuffle(clean)
    streams += [("clean, 1,000 images, B = 64", clean, 64), ("clean, 1,000 images, B = 16", clean, 16)]
    return streams


def changes(setup, stream, variants: list[str], seed: int) -> dict[str, float]:
    """Each variant's accuracy change against the source (points) on the decoded ``stream``."""
    from verdict import accuracy

    from tta_cli.bench.runner import parse_methods
    from tta_cli.runtime import seed_everything

    source = 100 * accuracy(stream.source, stream.labels)
    row = {"source": round(source, 1)}
    for spec in parse_methods(",".join(variants)):
        method = setup.build_method(spec.name, spec.hyperparameters, stream.images[0].shape[0], fresh_copy=True)
        seed_everything(seed)
        method.reseed(seed)
        logits = torch.cat([method.step(x).logits.detach().float() for x in stream.images]).numpy()
        method.close()
        row[spec.label] = round(100 * accuracy(logits, stream.labels) - source, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="auto,auto:bn_stream_prior_images=32000")
    parser.add_argument("--part", choices=("verdict", "held-out", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared", default=None)
    parser.add_argument("--cache", default=None)
    args = parser.parse_args()
    from verdict import RunSpec, decoded_stream, inet_paths, stream_items

    from tta_cli.runtime import start_run

    torch.set_num_threads(args.threads)
    shared, cache = shared_dir(args.shared, "data/imagenet-sample-256.tar.gz"), cache_dir(args.cache)
    folder, _ = inet_paths(shared, cache)
    setup = start_run(f"local-dir:{folder}", device="cpu")
    variants = args.variants.split(",")
    print("| stream | source | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    if args.part in ("verdict", "both"):
        for data, order, batch_size, seed in verdict_cells():
            spec = RunSpec("lite0", "lite0", data, order, "auto", batch_size, seed)
            stream = decoded_stream(setup, stream_items(spec, setup.loaded.class_names, Path(), cache), batch_size)
            row = changes(setup, stream, variants, seed)
            print(f"| {data} {order}, B = {batch_size} | {row['source']} | "
                  + " | ".join(f"{row[v]:+.1f}" for v in variants) + " |", flush=True)
    if args.part in ("held-out", "both"):
        for name, items, batch_size in held_out_streams(setup, cache, shared):
            row = changes(setup, decoded_stream(setup, items, batch_size), variants, 3)
            print(f"| {name} | {row['source']} | " + " | ".join(f"{row[v]:+.1f}" for v in variants) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
