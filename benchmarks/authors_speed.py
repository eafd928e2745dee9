"""Speed of tta's DeYO, RoTTA, LAME, ROID, CoTTA and RDumb against their authors' code, in one process.

Each case of ``../shared/fixtures/fidelity2`` (model, batch size, settings, seed) runs through the
authors' code, imported from a checkout given on the command line and never copied here, and
through ``tta``'s method on the library path of ``tta adapt`` (``create_method``, ``reseed``,
``run_stream``), on the same decoded tensors. Runs alternate (authors, tta, tta, authors, ...);
the report gives the median seconds of each, the ratio, and the share of predictions on which the
two agree and on which each agrees with the fixture's reference.

    python benchmarks/authors_speed.py --deyo /tmp/DeYO --md /tmp/MD             # every case, 1 thread
    python benchmarks/authors_speed.py --md /tmp/MD --cases rotta_bn_bs64 --repeats 5 --threads 2

``--deyo``: a checkout of github.com/Jhyun17/DeYO (its ``methods/deyo.py``, driven with the settings
of its ``main.py``); ``--md``: a checkout of github.com/mariodoebler/test-time-adaptation (its
``classification/`` folder: ``conf.py`` defaults merged with ``cfgs/cifar10_c/<method>.yaml``, the
model wrapped as MD wraps every timm model, images in [0, 1]). As for the fixtures, MD's modules
that these methods import but never use (open_clip, requests, pandas, autoattack, webdataset) are
empty stand-ins, and MD's RoTTA gets the one-argument ``loss_calculation`` its base class calls
(it takes none: a TypeError on any run without CUDA mixed precision). They need ``yacs``,
``iopath`` and ``einops`` (``pip install yacs iopath einops``; not dependencies of tta).
"""

from __future__ import annotations

import argparse
import csv
import importlib.machinery
import json
import math
import os
import random
import statistics
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from _common import shared_dir as common_shared_dir
from PIL import Image
from speed import Recorder
from torch import nn

from tta_cli.engine import run_stream
from tta_cli.runtime import RunSetup, SpeedOptions, start_run
from tta_cli.sources.items import Batch, StreamItem

GN, BN, LN = "cifar10-resnet18-gn", "cifar10-resnet18-bn", "cifar10-convnext-atto-ln"
UNUSED_BY_THESE_METHODS = ("open_clip", "requests", "pandas", "autoattack", "webdataset")


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    model: str
    batch_size: int
    tta_settings: dict[str, Any]
    md_settings: dict[str, Any] = field(default_factory=dict)
    """Overrides of MD's configuration (``SECTION.KEY``: value)."""
    deyo_settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


DEYO_TTA = {"lr": 1e-3}
CASES = [
    Case("deyo_gn_bs16_lr1e-3", "deyo", GN, 16, DEYO_TTA),
    Case("deyo_ln_bs16_lr1e-3", "deyo", LN, 16, {**DEYO_TTA, "layers": "all"}),
    Case("deyo_occ_gn_bs16_lr1e-3", "deyo", GN, 16,
         {**DEYO_TTA, "aug": "occ", "occ_size": 16, "occ_row": 8, "occ_col": 8},
         deyo_settings={"aug_type": "occ", "occlusion_size": 16, "row_start": 8, "column_start": 8}),
    Case("rotta_bn_bs64", "rotta", BN, 64, {"lr": 1e-3}),
    Case("lame_bn_bs64", "lame", BN, 64, {}),
    Case("lame_knn_bn_bs64", "lame", BN, 64, {"affinity": "knn"}, {"LAME.AFFINITY": "kNN"}),
    Case("roid_bn_bs64", "roid", BN, 64, {"lr": 1e-3}),
    Case("cotta_bn_bs64", "cotta", BN, 64, {"lr": 1e-3}),
    Case("rdumb_bn_bs16", "rdumb", BN, 16, {"lr": 1e-3, "reset_every": 10},
         {"MODEL.RESET_AFTER_NUM_UPDATES": 10}),
]
MD_CONFIG = {"rotta": "rotta", "lame": "lame", "roid": "roid", "cotta": "cotta", "rdumb": "rdumb"}

Step = Callable[[torch.Tensor], torch.Tensor]


def shared_dir() -> Path:
    return common_shared_dir(None, "fixtures/fidelity2/README.md")


def set_up(name: str) -> RunSetup:
    """The shared model through ``tta``'s own set-up call (fp32, no channels-last: the fixtures')."""
    return start_run(f"local-dir:{shared_dir() / 'models' / name}", speed=SpeedOptions("fp32", "off"))


def load_model(name: str) -> nn.Module:
    return set_up(name).loaded.model


def load_stream(model: nn.Module) -> tuple[torch.Tensor, list[str]]:
    """The fidelity stream (1,024 images, file order) in the model's own preprocessing."""
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    files = sorted((shared_dir() / "fixtures" / "fidelity" / "stream").glob("*.png"))
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files]), [f.name for f in files]


def reference_predictions(case: Case) -> torch.Tensor:
    path = shared_dir() / "fixtures" / "fidelity2" / "reference" / f"{case.name}.csv"
    with path.open(newline="") as f:
        return torch.tensor([int(row["pred"]) for row in csv.DictReader(f)])


def seed_globals(seed: int) -> None:
    """What the fixtures did just before the first batch: the authors' code draws from these."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# --- tta ------------------------------------------------------------------------------------------


def run_tta(case: Case, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    method = set_up(case.model).build_method(case.method, case.tta_settings, case.batch_size)
    batches, first = [], 0
    for chunk in x.split(case.batch_size):
        items = [StreamItem(str(first + i), Path(str(first + i))) for i in range(chunk.shape[0])]
        batches.append(Batch(items, chunk, first))
        first += chunk.shape[0]
    recorder = Recorder()
    start = time.perf_counter()
    method.reseed(case.seed)
    run_stream(method, batches, torch.device("cpu"), [recorder])
    return time.perf_counter() - start, torch.cat(recorder.preds)


# --- the authors' code ----------------------------------------------------------------------------


def stand_in(name: str) -> types.ModuleType:
    """An empty module whose every attribute is a placeholder class (only imported, never used)."""

    class StandIn(types.ModuleType):
        def __getattr__(self, attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {})

    module = StandIn(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def import_md(checkout: Path) -> types.SimpleNamespace:
    classification = checkout / "classification"
    if not (classification / "methods" / "rotta.py").is_file():
        sys.exit(f"{checkout} is not a checkout of mariodoebler/test-time-adaptation (no classification/methods)")
    for name in UNUSED_BY_THESE_METHODS:
        sys.modules.setdefault(name, stand_in(name))
    sys.path.insert(0, str(classification))
    import conf  # type: ignore[import-not-found]
    import methods  # type: ignore[import-not-found]  # noqa: F401  (registers every method)
    from methods.rotta import RoTTA  # type: ignore[import-not-found]
    from utils.registry import ADAPTATION_REGISTRY  # type: ignore[import-not-found]

    takes_none = RoTTA.loss_calculation
    RoTTA.loss_calculation = lambda self, *unused: takes_none(self)
    return types.SimpleNamespace(conf=conf, registry=ADAPTATION_REGISTRY, folder=classification)


class Normalize(nn.Module):
    """MD's wrapper for timm models: normalisation inside the model, images in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def md_step(md: types.SimpleNamespace, case: Case, model: nn.Module) -> Step:
    config = timm.data.resolve_model_data_config(model)
    if not model.pretrained_cfg.get("classifier"):  # MD's LAME finds the head by this name
        head = model.get_classifier()
        model.pretrained_cfg["classifier"] = next(n for n, m in model.named_modules() if m is head)
    wrapped = nn.Sequential(OrderedDict(normalize=Normalize(config["mean"], config["std"]), model=model))
    cfg = md.conf.cfg.clone()
    cfg.defrost()
    cfg.merge_from_file(str(md.folder / "cfgs" / "cifar10_c" / f"{MD_CONFIG[case.method]}.yaml"))
    cfg.TEST.BATCH_SIZE = case.batch_size
    for key, value in case.md_settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    method = md.registry.get(cfg.MODEL.ADAPTATION)(cfg=cfg, model=wrapped, num_classes=10)
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    return lambda x: method(x * std + mean)


def import_deyo(checkout: Path) -> types.ModuleType:
    if not (checkout / "methods" / "deyo.py").is_file():
        sys.exit(f"{checkout} is not a checkout of Jhyun17/DeYO (no methods/deyo.py)")
    sys.modules.setdefault("matplotlib", stand_in("matplotlib"))
    sys.modules.setdefault("matplotlib.pyplot", stand_in("matplotlib.pyplot"))
    sys.path.insert(0, str(checkout / "methods"))
    import deyo  # type: ignore[import-not-found]

    return deyo


def deyo_step(deyo: types.ModuleType, case: Case, model: nn.Module) -> Step:
    """Set up as the authors' main.py: their configure_model / collect_params, SGD momentum 0.9."""
    args = types.SimpleNamespace(
        wandb_log=False, filter_ent=True, filter_plpd=True, plpd_threshold=0.2, reweight_ent=1,
        reweight_plpd=1, aug_type="patch", patch_len=4, occlusion_size=112, row_start=56, column_start=56,
    )
    for key, value in case.deyo_settings.items():
        setattr(args, key, value)
    model = deyo.configure_model(model)
    params, _ = deyo.collect_params(model)
    optimizer = torch.optim.SGD(params, lr=case.tta_settings["lr"], momentum=0.9)
    method = deyo.DeYO(model, args, optimizer, deyo_margin=0.5 * math.log(10), margin_e0=0.4 * math.log(10))
    counter = iter(range(10**9))
    return lambda x: method(x, next(counter))[0]


def run_authors(build: Callable[[nn.Module], Step], case: Case, model: nn.Module,
                x: torch.Tensor) -> tuple[float, torch.Tensor]:
    step = build(model)
    preds = []
    start = time.perf_counter()
    seed_globals(case.seed)
    for chunk in x.split(case.batch_size):
        preds.append(step(chunk).argmax(1))
    return time.perf_counter() - start, torch.cat(preds)


# --- the comparison -------------------------------------------------------------------------------


def compare(case: Case, build: Callable[[nn.Module], Step], repeats: int) -> dict[str, Any]:
    source = load_model(case.model)
    x, _ = load_stream(source)
    reference = reference_predictions(case)
    fresh = {"authors": lambda: run_authors(build, case, load_model(case.model), x),
             "tta": lambda: run_tta(case, x)}
    seconds: dict[str, list[float]] = {"authors": [], "tta": []}
    preds: dict[str, torch.Tensor] = {}
    for rep in range(repeats):
        for impl in ("authors", "tta") if rep % 2 == 0 else ("tta", "authors"):
            elapsed, preds[impl] = fresh[impl]()
            seconds[impl].append(elapsed)
            print(f"  {case.name} {impl} rep {rep}: {elapsed:.2f} s", file=sys.stderr)
    n = x.shape[0]
    row = {"case": case.name, "method": case.method, "model": case.model, "batch_size": case.batch_size,
           "images": n, "authors_seconds": seconds["authors"], "tta_seconds": seconds["tta"],
           "authors_ips": n / statistics.median(seconds["authors"]),
           "tta_ips": n / statistics.median(seconds["tta"]),
           "same_predictions": float((preds["authors"] == preds["tta"]).float().mean()),
           "authors_vs_reference": float((preds["authors"] == reference).float().mean()),
           "tta_vs_reference": float((preds["tta"] == reference).float().mean())}
    row["speedup"] = row["tta_ips"] / row["authors_ips"]
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | authors img/s | tta img/s | tta / authors | same predictions | "
             "authors = reference | tta = reference |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['case']}` | {r['authors_ips']:.0f} | {r['tta_ips']:.0f} | {r['speedup']:.2f}x | "
                     f"{100 * r['same_predictions']:.1f}% | {100 * r['authors_vs_reference']:.1f}% | "
                     f"{100 * r['tta_vs_reference']:.1f}% |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deyo", type=Path, help="a checkout of github.com/Jhyun17/DeYO")
    p.add_argument("--md", type=Path, help="a checkout of github.com/mariodoebler/test-time-adaptation")
    p.add_argument("--cases", type=lambda s: s.split(","), default=None, help="default: every case with a checkout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the fixtures: 1)")
    p.add_argument("--json", type=Path, help="write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    builders: dict[str, Callable[[Case], Callable[[nn.Module], Step]]] = {}
    if args.deyo:
        deyo = import_deyo(args.deyo)
        builders["deyo"] = lambda case: lambda model: deyo_step(deyo, case, model)
    if args.md:
        md = import_md(args.md)
        for method in MD_CONFIG:
            builders[method] = lambda case: lambda model: md_step(md, case, model)
    if not builders:
        sys.exit("give --deyo and/or --md: the authors' code to compare with")
    cases = [c for c in CASES if c.method in builders and (args.cases is None or c.name in args.cases)]
    if not cases:
        sys.exit(f"no case to run: cases are {', '.join(c.name for c in CASES)}")
    rows = []
    for case in cases:
        rows.append(compare(case, builders[case.method](case), args.repeats))
        print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr)
    result = {"threads": args.threads, "load_average_end": os.getloadavg(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
