"""Record the authors' own COME, ZeroSiam and forward-only outputs on the shared fidelity stream.

    python benchmarks/record_fidelity3.py come /tmp/come --out tests/fixtures/fidelity3

The second argument is the path to the authors' checkout (its modules are imported from there,
unchanged; nothing of theirs is copied here). Each case runs the authors' method on
``../shared/fixtures/fidelity/stream`` in stream order with one of the shared CIFAR-10 models, on
the CPU in float32 with one thread, seeding torch (and numpy, random) with 0 immediately before the
first batch (the fidelity2 seed protocol), and writes ``<case>.csv`` (index, file, pred, entropy,
label: the outputs the method returns for each batch) and ``<case>.params.safetensors`` (every
parameter the method adapted, after the whole stream, under its timm name). The cases, with the
flags of the equivalent ``tta adapt`` run, are in ``CASES`` (and tests/test_fidelity3.py).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import random
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_model_data_config
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GN, LN, BN = "cifar10-resnet18-gn", "cifar10-convnext-atto-ln", "cifar10-resnet18-bn"


@dataclass(frozen=True)
class Case:
    method: str
    model: str
    batch_size: int
    lr: float
    """SGD learning rate (zerosiam: the base rate, scaled by lr_scale and lr_p; foa_shift: unused)."""
    lr_scale: float = 10.0
    lr_p: float = 100.0


CASES = {
    "come_gn_bs16_lr1e-2": Case("come", GN, 16, 1e-2),
    "come_ln_bs16_lr1e-2": Case("come", LN, 16, 1e-2),
    "come_gn_bs1_lr1e-3": Case("come", GN, 1, 1e-3),
    # SAR_COME: SAR's fixture settings (B = 16, lr 1e-3), margin 0.4 ln 10
    "come_sar_gn_bs16_lr1e-3": Case("come_sar", GN, 16, 1e-3),
    "come_sar_ln_bs16_lr1e-3": Case("come_sar", LN, 16, 1e-3),
    # zerosiam: the authors' base lr rule for ResNet-50-GN (conv: 0.00025/64 * B * 2 below B = 32,
    # doubled at B = 1) with their ResNet-50-GN scales 10 / 100; the same base lr on ConvNeXt
    "zerosiam_gn_bs16": Case("zerosiam", GN, 16, 0.00025 / 64 * 16 * 2),
    "zerosiam_ln_bs16": Case("zerosiam", LN, 16, 0.00025 / 64 * 16 * 2),
    "zerosiam_gn_bs1": Case("zerosiam", GN, 1, 0.00025 / 64 * 1 * 2 * 2),
    "zerosiam_bn_bs16": Case("zerosiam", BN, 16, 0.00025 / 64 * 16 * 2),
    # foa_shift: nothing learned (lr unused); source statistics from fidelity/clean (256 images)
    "foa_shift_gn_bs64": Case("foa_shift", GN, 64, 0.0),
    "foa_shift_ln_bs64": Case("foa_shift", LN, 64, 0.0),
    "foa_shift_bn_bs64": Case("foa_shift", BN, 64, 0.0),
    "foa_shift_gn_bs1": Case("foa_shift", GN, 1, 0.0),
}


def load_stream(model: torch.nn.Module, batch_size: int,
                folder: str = "stream") -> Iterator[tuple[list[dict[str, str]], torch.Tensor]]:
    """The fidelity stream (or clean set) in file order, preprocessed as the model's pretrained_cfg says."""
    stream = SHARED / "fixtures" / "fidelity" / folder
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    with (stream / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = [transform(Image.open(stream / r["file"]).convert("RGB")) for r in chunk]
        yield chunk, torch.stack(images)


def load_model(name: str) -> torch.nn.Module:
    return timm.create_model(f"local-dir:{SHARED / 'models' / name}", pretrained=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_come(authors: Path, model: torch.nn.Module, case: Case) -> tuple[Callable, dict[str, torch.nn.Parameter]]:
    """The authors' Tent_COME as their main.py builds it (SGD, momentum 0.9, one step)."""
    tent_come = importlib.import_module("tent_come")
    model = tent_come.configure_model(model)
    params, names = tent_come.collect_params(model)
    optimizer = torch.optim.SGD(params, case.lr, momentum=0.9)
    adapted = tent_come.Tent_COME(model, optimizer, steps=1, args=argparse.Namespace())
    return adapted, dict(zip(names, params, strict=True))


def build_zerosiam(authors: Path, model: torch.nn.Module, case: Case) -> tuple[Callable, dict[str, torch.nn.Parameter]]:
    """The authors' ZeroSiam as their main.py builds it: BYOLWrapper, two SGD optimisers.

    The wrapper picks its feature pooling by model name: ``resnet50_gn_timm`` (timm global pool)
    for the ResNets, ``convnext_tiny`` (head pool, norm, flatten) for ConvNeXt."""
    wrapper = importlib.import_module("models.byol_wrapper").BYOLWrapper
    zerosiam = importlib.import_module("tta_library.zerosiam")
    net = wrapper(model, "convnext_tiny" if case.model == LN else "resnet50_gn_timm")
    net = zerosiam.configure_model(net)
    params, names = zerosiam.collect_params(net)
    backbone = torch.optim.SGD(params, case.lr * case.lr_scale, momentum=0.9)
    predictor = torch.optim.SGD(list(net.predictor.parameters()), case.lr * case.lr_p, momentum=0.9)
    adapted = zerosiam.ZeroSiam(net, backbone, predictor)
    return adapted, {n.removeprefix("model."): p for n, p in zip(names, params, strict=True)}


class PooledFeatures(torch.nn.Module):
    """Shim for FOA's Shift, which reads ``layers_cls_features(_with_prompts)`` (per-layer class
    tokens, the last 768 values the final one) and ``vit.head`` of its ViT wrapper: for the CNNs they
    are the pooled pre-logits feature and the classifier (512 / 320 values, so its ``[-768:]`` slices
    keep all of them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.vit = types.SimpleNamespace(head=model.get_classifier())

    def layers_cls_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    layers_cls_features_with_prompts = layers_cls_features


def build_foa_shift(authors: Path, model: torch.nn.Module, case: Case) -> tuple[Callable, dict[str, nn.Parameter]]:
    """The authors' Shift (``foa_shift`` of their main.py: eval mode, source statistics first).

    Shims: ``cma`` (imported, unused by Shift) is an empty module; ``Tensor.cuda`` is the identity
    while the source statistics are taken (their loop calls ``images.cuda()``)."""
    sys.modules.setdefault("cma", types.ModuleType("cma"))
    shift = importlib.import_module("tta_library.foa_shift")
    model.eval()
    model.requires_grad_(False)
    adapted = shift.Shift(PooledFeatures(model))
    clean = [(images,) for _, images in load_stream(model, 64, "clean")]
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        adapted.obtain_origin_stat(clean)
    finally:
        torch.Tensor.cuda = cuda
    return adapted, {}


def build_come_sar(authors: Path, model: torch.nn.Module, case: Case) -> tuple[Callable, dict[str, nn.Parameter]]:
    """The authors' SAR_COME as their main.py builds it (SAM around SGD, momentum 0.9), with the
    reliable margin 0.4 ln C for C = 10 (their default is ImageNet's 0.4 ln 1000)."""
    sar_come = importlib.import_module("sar_come")
    sam = importlib.import_module("sam")
    model = sar_come.configure_model(model)
    params, names = sar_come.collect_params(model)
    optimizer = sam.SAM(params, torch.optim.SGD, lr=case.lr, momentum=0.9)
    adapted = sar_come.SAR_COME(model, optimizer, margin_e0=0.4 * math.log(10))
    return adapted, dict(zip(names, params, strict=True))


BUILDERS = {"come": build_come, "come_sar": build_come_sar, "zerosiam": build_zerosiam, "foa_shift": build_foa_shift}


def watch_resets(adapted: torch.nn.Module) -> set[int]:
    """The batches (0-based) after which the authors' method restored the source model."""
    resets: set[int] = set()
    batches = [0]
    forward, reset = adapted.forward, adapted.reset

    def counted_forward(x: torch.Tensor) -> torch.Tensor:
        out = forward(x)
        batches[0] += 1
        return out

    def noted_reset() -> None:
        resets.add(batches[0])
        reset()

    adapted.forward, adapted.reset = counted_forward, noted_reset
    return resets


def record(authors: Path, name: str, case: Case, out: Path) -> None:
    model = load_model(case.model)
    adapted, params = BUILDERS[case.method](authors, model, case)
    resets = watch_resets(adapted) if case.method == "come_sar" else None
    seed_everything(0)
    rows = []
    for batch, (chunk, images) in enumerate(load_stream(model, case.batch_size)):
        logits = adapted(images).detach()
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        for row, pred, ent in zip(chunk, logits.argmax(1).tolist(), entropy.tolist(), strict=True):
            rows.append({"index": len(rows), "file": row["file"], "pred": pred, "entropy": f"{ent:.6f}",
                         "label": row["label"]})
            if resets is not None:  # SAR_COME: 1 on the rows of a batch after which the model was recovered
                rows[-1]["reset"] = int(batch in resets)
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if params:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, str(out / f"{name}.params.safetensors"))
    accuracy = sum(str(r["pred"]) == r["label"] for r in rows) / len(rows)
    print(f"{name}: accuracy {accuracy:.2%}, {len(params)} tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(BUILDERS))
    parser.add_argument("authors", type=Path, help="the authors' checkout")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/fidelity3"))
    parser.add_argument("--case", action="append", help="only these cases")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(args.authors.resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        if case.method == args.method and (not args.case or name in args.case):
            record(args.authors, name, case, args.out)


if __name__ == "__main__":
    main()
