"""How often auto's few-classes rule (``tta_cli.methods.auto.few_classes``) would give a batch of a
shuffled stream to LAME: simulated source predictions, drawn independently per image from a
Zipf-distributed class prior (a source model that favours some classes, as weak ones do), at
several class counts and batch sizes. No model, no data; a few seconds.

    python benchmarks/few_classes_null.py [--images 20000] [--seeds 5]
"""

from __future__ import annotations

import argparse

import torch

from tta_cli.collapse_window import default_window
from tta_cli.methods.auto.few_classes import FewClasses


def false_share(classes: int, batch_size: int, images: int, seeds: int, zipf: float) -> float:
    prior = torch.arange(1, classes + 1, dtype=torch.float64) ** -zipf
    prior /= prior.sum()
    given = batches = 0
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        gate = FewClasses(classes, default_window(batch_size, classes))
        for batch in range(images // batch_size):
            given += gate.add(torch.multinomial(prior, batch_size, replacement=True, generator=generator), batch)
            batches += 1
    return given / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print("| classes | Zipf exponent | " + " | ".join(f"B = {b}" for b in (2, 4, 16, 64)) + " |")
    print("|---|---|" + "---|" * 4)
    for classes in (10, 100, 1000):
        for zipf in (0.0, 1.0):
            shares = [false_share(classes, b, args.images, args.seeds, zipf) for b in (2, 4, 16, 64)]
            print(f"| {classes} | {zipf:g} | " + " | ".join(f"{100 * s:.2f}%" for s in shares) + " |")


if __name__ == "__main__":
    main()
