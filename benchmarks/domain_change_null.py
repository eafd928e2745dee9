"""How often auto's domain-change detector fires where nothing changes, and where it should.

``tta_cli/methods/auto/domain_change.py`` resets auto's inner method on GroupNorm/LayerNorm models
where the input's domain changes. This replays the shipped detector (its constants unchanged) on
the source model's statistics of two kinds of CIFAR-10-C streams (severity 5, CIFAR parameters):

* *no change*: 512 images of one corruption (or clean), shuffled, for every corruption and seed:
  any detection is a false alarm (a reset that throws away what the inner method learnt);
* *continual*: 200 images of each corruption of a part, one corruption after another (the parts of
  ``tta bench``'s tables: quick, held, other): a change counts as found when a detection falls
  within 128 images after it; detections elsewhere are counted as extra.

Nothing adapts here: the detector watches the frozen source model, so one forward per stream
serves every batch size. About 10 minutes on 2 CPU cores (the first run corrupts the images)::

    python benchmarks/domain_change_null.py --models gn,ln --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from _common import cache_dir, shared_dir

MODELS = {"gn": "cifar10-resnet18-gn", "ln": "cifar10-convnext-atto-ln"}
PARTS = {"quick": ("gaussian_noise", "defocus_blur", "snow", "fog", "contrast"),
         "held": ("gaussian_blur", "saturate", "spatter", "speckle_noise"),
         "other": ("brightness", "frost", "glass_blur", "impulse_noise", "jpeg_compression", "motion_blur",
                   "pixelate", "zoom_blur")}
NO_CHANGE = ("clean", "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
             "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "brightness",
             "contrast", "saturate", "spatter", "elastic_transform", "pixelate", "jpeg_compression")
STREAM_IMAGES, SEGMENT_IMAGES, FOUND_WITHIN = 512, 200, 128


def statistics(setup, items: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per image: the detector's statistics (the first norm layer's input) and the source's class."""
    from tta_cli.methods.auto.domain_change import first_norm_statistics
    from tta_cli.methods.selection import norm_modules

    model = setup.loaded.model.eval()
    stats, preds = [], []
    watched = norm_modules(model)[0][1]  # the layer the detector watches
    handle = watched.register_forward_pre_hook(
        lambda module, args: stats.append(first_norm_statistics(module, args[0])))
    with torch.no_grad():
        for batch in setup.batches(items, 64):
            logits = model(batch.images)
            preds.append(logits.argmax(1))
    handle.remove()
    return torch.cat(stats), torch.cat(preds), int(logits.shape[1])


def detections(recorded: tuple[torch.Tensor, torch.Tensor, int], batch_size: int) -> list[int]:
    """The batches where the shipped detector finds a change, fed ``batch_size`` images at a time."""
    from tta_cli.methods.auto.domain_change import DomainChange

    stats, preds, num_classes = recorded
    detector = DomainChange(torch.nn.Identity())  # fed the recorded statistics instead of a hook's
    found = []
    for batch, start in enumerate(range(0, len(preds), batch_size)):
        detector.observe(stats[start:start + batch_size])
        if detector.add(preds[start:start + batch_size], num_classes, batch):
            found.append(batch)
    return found


def score(found: list[int], changes: list[int], batch_size: int) -> tuple[int, int]:
    """(changes found within ``FOUND_WITHIN`` images, detections near no change)."""
    used: set[int] = set()
    for image in changes:
        near = [b for b in found if image <= (b + 1) * batch_size - 1 and b * batch_size <= image + FOUND_WITHIN]
        if near:
            used.add(near[0])
    return len(used), len([b for b in found if b not in used])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gn,ln")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-sizes", default="16,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shared", default=None)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--out", default="runs/domain_change_null.jsonl")
    args = parser.parse_args()
    from cifar10_wild import corrupted, extract_cifar

    from tta_cli.runtime import start_run
    from tta_cli.sources.folder import folder_items

    torch.set_num_threads(args.threads)
    shared, cache = shared_dir(args.shared, "data/cifar10-jpeg.tar.gz"), cache_dir(args.cache)
    test, _ = extract_cifar(shared / "data" / "cifar10-jpeg.tar.gz", cache, 500)
    names = [n for n in NO_CHANGE if n != "clean"] + [n for part in PARTS.values() for n in part]
    root = corrupted(test, cache, ",".join(dict.fromkeys(names)), STREAM_IMAGES, preset="cifar")
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models.split(","):
        setup = start_run(f"local-dir:{shared / 'models' / MODELS[model]}", device="cpu")
        pool = {name: folder_items(test if name == "clean" else root / name / "5", setup.loaded.class_names)
                for name in dict.fromkeys(("clean", *names))}
        for seed in seeds:
            for name in NO_CHANGE:
                items = random.Random(f"{seed}/{name}").sample(pool[name], min(STREAM_IMAGES, len(pool[name])))
                recorded = statistics(setup, items)
                for size in sizes:
                    found = detections(recorded, size)
                    rows.append({"model": model, "seed": seed, "batch_size": size, "stream": name,
                                 "kind": "no change", "detections": found, "false_alarm": bool(found)})
            for part, corruptions in PARTS.items():
                items = [item for name in corruptions
                         for item in random.Random(f"{seed}/{name}").sample(pool[name], SEGMENT_IMAGES)]
                recorded = statistics(setup, items)
                changes = [i * SEGMENT_IMAGES for i in range(1, len(corruptions))]
                for size in sizes:
                    found = detections(recorded, size)
                    hits, extra = score(found, changes, size)
                    rows.append({"model": model, "seed": seed, "batch_size": size, "stream": part, "kind": "continual",
                                 "detections": found, "changes": len(changes), "found": hits, "extra": extra})
            print(f"{model} seed {seed} done", flush=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print("| model | B | no-change streams with a detection | changes found (within 128 images) | extra detections |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        for size in sizes:
            mine = [r for r in rows if r["model"] == model and r["batch_size"] == size]
            quiet = [r for r in mine if r["kind"] == "no change"]
            moving = [r for r in mine if r["kind"] == "continual"]
            print(f"| {model} | {size} | {sum(r['false_alarm'] for r in quiet)} of {len(quiet)} | "
                  f"{sum(r['found'] for r in moving)} of {sum(r['changes'] for r in moving)} | "
                  f"{sum(r['extra'] for r in moving)} |")


if __name__ == "__main__":
    main()
