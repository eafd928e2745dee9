"""auto (and any other method) at small batch sizes, on a shuffled and a class-ordered stream.

One labelled class-folder set (e.g. one corruption written by ``tta corrupt``, or clean images),
a seeded sample of ``--limit`` images, fed in a seeded shuffled order and sorted by class, at each
``--batch-sizes`` value; every method starts from the loaded model. Prints accuracy (%) per
(batch size, order, method) and, for auto on BatchNorm models, the mean weight of the batch
statistics. docs/BENCHMARKS.md ("auto at small batches") was made with::

    python benchmarks/auto_batch_size.py --model local-dir:../shared/models/cifar10-resnet18-bn \\
        --data DIR/gaussian_noise/5 --limit 2000 --batch-sizes 2,4,8,16,64
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from tta_cli.bench.runner import parse_methods
from tta_cli.runtime import start_run
from tta_cli.sources.folder import folder_items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path, help="a class-folder set")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--batch-sizes", default="2,4,8,16,64")
    parser.add_argument("--methods", default="source,norm,auto", help="as tta bench --methods takes them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    setup = start_run(args.model, threads=args.threads)
    items = folder_items(args.data, setup.loaded.class_names)
    random.Random(args.seed).shuffle(items)
    items = items[:args.limit]
    batch = next(iter(setup.batches(items, len(items), 0)))
    x, y = batch.images, batch.labels
    assert y is not None, "the set has no labels"
    orders = {"shuffled": torch.arange(len(y)), "class-ordered": torch.argsort(y, stable=True)}
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        for order, index in orders.items():
            for spec in parse_methods(args.methods):
                method = setup.build_method(spec.name, spec.hyperparameters, batch_size, fresh_copy=True)
                predictions = torch.cat([method.step(x[i]).logits.argmax(1) for i in index.split(batch_size)])
                row = {"batch_size": batch_size, "order": order, "method": spec.label,
                       "accuracy": round(100 * (predictions == y[index]).float().mean().item(), 1)}
                share = method.stats().get("batch_statistics_share")
                if share is not None:
                    row["batch_statistics_share"] = round(share, 2)
                method.close()
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
