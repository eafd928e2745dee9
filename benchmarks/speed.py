"""Speed of tta's adaptation loop against a plain loop of the same algorithms.

For each model and method (``source``, ``tent``, ``eta``, ``sar``) the same stream goes through
``tta`` (``create_method`` + ``run_stream``, the library path of ``tta adapt``) and through a plain
reference loop written here step by step from the papers (docs/METHODS.md), with none of
tta's optimisations: boolean indexing, full-batch passes, a deep copy of the whole model for SAR's
recovery, Python-float bookkeeping. Runs alternate (plain, tta, tta, plain, ...) in one process
and the report gives medians, ratios, the share of identical predictions and peak memory.

    python benchmarks/speed.py                                  # shared CIFAR-10 models, CPU, B=64
    python benchmarks/speed.py --models vit_base_patch16_224 --batch-size 16 --images 48 --repeats 3
    python benchmarks/speed.py --device cuda --precision bf16 --models vit_base_patch16_224
    python benchmarks/speed.py --make-jpegs DIR --images 2048       # a JPEG folder (256 px) for ...
    python benchmarks/speed.py --adapt-folder DIR --models vit_base_patch16_224   # ... `tta adapt`
    python benchmarks/speed.py --authors /tmp/SAR --folder DIR --models cifar10-resnet18-gn
    python benchmarks/speed.py --authors /tmp/SAR --methods sar --models cifar10-resnet18-gn --images 1024

``--authors PATH`` without ``--folder`` replaces the plain loop by the authors' SAR in the
in-process comparison (``--methods sar``; the table's "plain" columns are then theirs).

``--authors PATH --folder DIR`` times whole processes against whole processes on a folder of images: ``tta adapt
--method sar``, the authors' SAR (``sar.py`` and ``sam.py`` imported from PATH, a checkout of
github.com/mr-eggplant/SAR that is never copied here, driven as their script does: decode the whole
folder, then loop) and the plain loop below (same driver), interleaved, same model, hyperparameters
and predictions checked.

Models named ``cifar10-*`` are the shared trained ones (``local-dir:``); any other name is a timm
architecture with random weights, for which the entropy margin is set so that about half of the
first batch is reliable (a random model is uncertain everywhere; without this the filters would
select nothing and SAR would cost one forward). Data: the shared fidelity stream (corrupted
CIFAR-10), in each model's own preprocessing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import nn

from tta_cli.engine import run_stream
from tta_cli.methods import Method, get_method_class
from tta_cli.methods.base import default_lr
from tta_cli.runtime import RunSetup, SpeedOptions, start_run
from tta_cli.sources.items import Batch, StreamItem

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("source", "tent", "eta", "sar")
SHARED_MODELS = ("cifar10-resnet18-bn", "cifar10-resnet18-gn", "cifar10-convnext-atto-ln")
E0_FACTOR = 0.4
PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def shared_dir() -> Path:
    env = os.environ.get("TTA_SHARED")
    path = Path(env) if env else ROOT.parent / "shared"
    if not (path / "fixtures" / "fidelity" / "stream").is_dir():
        sys.exit(f"the shared folder is absent at {path} (set TTA_SHARED)")
    return path


# --- models and data ------------------------------------------------------------------------------


def model_spec(name: str) -> str:
    return f"local-dir:{shared_dir() / 'models' / name}" if name.startswith("cifar10-") else name


def set_up(name: str, device: str = "cpu", threads: int | None = None, precision: str = "fp32",
           compile: bool = False) -> RunSetup:
    """The model (shared trained weights, or a timm architecture with random weights from seed 0) and
    the speed options through ``tta``'s own set-up call, as ``tta adapt`` and ``tta bench`` do."""
    return start_run(model_spec(name), pretrained=name.startswith("cifar10-"), device=device, seed=0,
                     threads=threads, speed=SpeedOptions(precision, "auto", compile))


def load_images(runtime: RunSetup, n: int) -> torch.Tensor:
    """The first ``n`` images of the shared fidelity stream, in the model's preprocessing."""
    files = sorted((shared_dir() / "fixtures" / "fidelity" / "stream").glob("*.png"))[:n]
    return torch.stack([runtime.transform(Image.open(f).convert("RGB")) for f in files])


def entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def margin_factor(name: str, model: nn.Module, first: torch.Tensor) -> float:
    """The paper's 0.4 for trained models; for random ones the factor that makes the first batch's
    median entropy the threshold (half reliable)."""
    if name.startswith("cifar10-"):
        return E0_FACTOR
    with torch.no_grad():
        logits = model.eval()(first)
    return float(entropy(logits).median()) / math.log(logits.shape[1]) + 1e-6


# --- the plain reference loops (docs/METHODS.md, step by step, no optimisation) -------------------


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    kinds = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds) and m.weight is not None]


def sar_frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The authors' rule by name: ResNet skips layer4, a 12-block ViT blocks 9-11 and norm;
    ConvNeXt (same rule, by stage) its last stage and final norm."""
    if hasattr(model, "layer4"):
        return ("layer4",)
    if hasattr(model, "blocks"):
        n = len(model.blocks)
        return (*(f"blocks.{i}" for i in range(n - max(1, round(n / 4)), n)), "norm", "fc_norm")
    if hasattr(model, "stages"):
        return (f"stages.{len(model.stages) - 1}", "head.norm")
    raise ValueError(f"no SAR layer rule for {type(model).__name__}")


def plain_param_names(model: nn.Module, method: str) -> list[str]:
    """Norm affine parameters, all of them (tent, eta) or by the SAR rule."""
    frozen = sar_frozen_prefixes(model) if method == "sar" else ()
    return [f"{name}.{p}" for name, _ in norm_layers(model) for p in ("weight", "bias")
            if not any(name == f or name.startswith(f + ".") for f in frozen)]


def configure_plain(model: nn.Module, method: str) -> list[nn.Parameter]:
    """Train mode, BatchNorm on batch statistics (running buffers dropped), norm affine trainable."""
    model.train()
    model.requires_grad_(False)
    for _, module in norm_layers(model):
        if isinstance(module, nn.BatchNorm2d):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
    named = dict(model.named_parameters())
    params = [named[n] for n in plain_param_names(model, method)]
    for p in params:
        p.requires_grad_(True)
    return params


class PlainSource:
    def __init__(self, model: nn.Module, **_: Any) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PlainTent:
    def __init__(self, model: nn.Module, lr: float, **_: Any) -> None:
        self.model = model
        self.params = configure_plain(model, "tent")
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        entropy(logits).mean(0).backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return logits.detach()


class PlainETA:
    def __init__(self, model: nn.Module, lr: float, margin: float, **_: Any) -> None:
        self.model = model
        self.params = configure_plain(model, "eta")
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.margin_factor = margin
        self.probs: torch.Tensor | None = None

    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        e0 = self.margin_factor * math.log(logits.shape[1])
        ent = entropy(logits)
        reliable = ent < e0
        ent = ent[reliable]
        probs = logits[reliable].softmax(1)
        if self.probs is not None:
            cosine = torch.nn.functional.cosine_similarity(self.probs.unsqueeze(0), probs, dim=1)
            keep = cosine.abs() < 0.05
            ent, probs = ent[keep], probs[keep]
        if probs.shape[0] > 0:
            mean = probs.detach().mean(0)
            self.probs = mean if self.probs is None else 0.9 * self.probs + (1 - 0.9) * mean
        weights = 1 / torch.exp(ent.detach() - e0)
        if ent.shape[0] > 0:
            (ent * weights).mean(0).backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        return logits.detach()


class PlainSAR:
    def __init__(self, model: nn.Module, lr: float, margin: float, **_: Any) -> None:
        self.model = model
        self.params = configure_plain(model, "sar")
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9)
        self.margin_factor = margin
        self.ema: float | None = None
        self.model_state = copy.deepcopy(model.state_dict())  # the authors' recovery snapshot

    def step(self, x: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        logits = self.model(x)
        e0 = self.margin_factor * math.log(logits.shape[1])
        ent = entropy(logits)
        reliable = ent < e0
        ent[reliable].mean(0).backward()
        old = self.sam_first_step()
        self.optimizer.zero_grad()
        ent2 = entropy(self.model(x))[reliable]
        loss2 = ent2[ent2 < e0].mean(0)
        loss2.backward()
        with torch.no_grad():
            for p, saved in zip(self.params, old, strict=True):
                p.copy_(saved)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.recover(loss2.item())
        return logits.detach()

    @torch.no_grad()
    def sam_first_step(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)
        scale = 0.05 / (norm + 1e-12)
        old = [p.detach().clone() for p in self.params]
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad * scale)
        return old

    def recover(self, loss: float) -> None:
        if not math.isnan(loss):
            self.ema = loss if self.ema is None else 0.9 * self.ema + (1 - 0.9) * loss
        if self.ema is not None and self.ema < 0.2:
            self.model.load_state_dict(copy.deepcopy(self.model_state))
            self.ema = None


PLAIN = {"source": PlainSource, "tent": PlainTent, "eta": PlainETA, "sar": PlainSAR}


# --- one timed run --------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    runtime: RunSetup
    model: nn.Module
    images: torch.Tensor
    batch_size: int
    device: torch.device
    precision: str
    compile: bool
    margin: float
    lr: float
    copies: bool = True
    """Each run adapts a fresh copy of the model (off in a memory probe, which runs once)."""

    def batches(self) -> list[torch.Tensor]:
        return list(self.images.split(self.batch_size))

    def fresh_model(self) -> nn.Module:
        return (copy.deepcopy(self.model) if self.copies else self.model).to(self.device)


@dataclass
class Run:
    seconds: float
    preds: torch.Tensor
    peak_mib: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def autocast(setup: Setup) -> Any:
    dtype = PRECISION_DTYPES[setup.precision]
    if dtype is None:
        return torch.autocast(setup.device.type, enabled=False)
    return torch.autocast(setup.device.type, dtype=dtype)


def run_plain(setup: Setup, method: str, n_batches: int | None = None) -> Run:
    model = setup.fresh_model()
    loop = PLAIN[method](model, lr=setup.lr, margin=setup.margin)
    preds = []
    start = time.perf_counter()
    for x in setup.batches()[:n_batches]:
        with autocast(setup):  # the plain way: everything under autocast, no loss scaling
            logits = loop.step(x.to(setup.device))
        preds.append(logits.argmax(1).cpu())
    sync(setup.device)
    return Run(time.perf_counter() - start, torch.cat(preds))


class Recorder:
    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []

    def on_batch(self, out: Any) -> None:
        self.preds.append(out.pred)


def shared_hyperparameters(method: str, lr: float, margin: float) -> dict[str, Any]:
    """The learning rate and the entropy margin of the comparison, for the methods that have them."""
    fields = {f.name for f in dataclasses.fields(get_method_class(method).config_class)}
    return {key: value for key, value in (("lr", lr), ("margin_factor", margin)) if key in fields}


def build_tta(setup: Setup, method: str) -> Method:
    """The method through ``RunSetup.build_method``: the model, precision and memory format as a
    ``tta adapt`` run gets them."""
    hyperparameters = shared_hyperparameters(method, setup.lr, setup.margin)
    return setup.runtime.build_method(method, hyperparameters, setup.batch_size, fresh_copy=setup.copies)


def tta_batches(setup: Setup, n_batches: int | None) -> list[Batch]:
    pin = setup.device.type == "cuda"
    out, first = [], 0
    for x in setup.batches()[:n_batches]:
        items = [StreamItem(str(first + i), Path(str(first + i))) for i in range(x.shape[0])]
        out.append(Batch(items, x.pin_memory() if pin else x, first))
        first += x.shape[0]
    return out


def run_tta(setup: Setup, method: str, n_batches: int | None = None) -> Run:
    tta = build_tta(setup, method)
    batches = tta_batches(setup, n_batches)
    recorder = Recorder()
    start = time.perf_counter()
    totals = run_stream(tta, batches, setup.device, [recorder])
    sync(setup.device)
    seconds = time.perf_counter() - start
    stats = {"used_share": totals.used_share, "filter_counts": totals.filter_counts,
             "images": totals.images, **tta.stats()}
    return Run(seconds, torch.cat(recorder.preds), stats=stats)


def authors_sar(model: nn.Module, lr: float, margin_factor: float,
                authors: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The authors' SAR (``sar.py`` and ``sam.py`` imported from their checkout), set up as their
    script does: their configure_model / collect_params, SAM over SGD with momentum 0.9."""
    if str(authors) not in sys.path:
        sys.path.insert(0, str(authors))
    import sam as authors_sam  # type: ignore[import-not-found]
    import sar as authors_sar  # type: ignore[import-not-found]

    model = authors_sar.configure_model(model)
    params, _ = authors_sar.collect_params(model)
    optimizer = authors_sam.SAM(params, torch.optim.SGD, lr=lr, momentum=0.9)
    n_classes = model.get_classifier().out_features
    return authors_sar.SAR(model, optimizer, margin_e0=margin_factor * math.log(n_classes))


AUTHORS_CHECKOUT: list[Path] = []
"""Set by ``--authors`` without ``--folder``: the in-process comparison's baseline is their SAR."""


def run_authors(setup: Setup, method: str, n_batches: int | None = None) -> Run:
    if method != "sar":
        raise SystemExit("the in-process authors' baseline exists for sar only (--methods sar)")
    step = authors_sar(setup.fresh_model(), setup.lr, setup.margin, AUTHORS_CHECKOUT[0])
    preds = []
    start = time.perf_counter()
    for x in setup.batches()[:n_batches]:
        preds.append(step(x.to(setup.device)).argmax(1).cpu())
    sync(setup.device)
    return Run(time.perf_counter() - start, torch.cat(preds))


RUNNERS: dict[str, Callable[[Setup, str, int | None], Run]] = {"plain": run_plain, "tta": run_tta}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- peak memory ----------------------------------------------------------------------------------


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure_memory(setup: Setup, impl: str, method: str, n_batches: int) -> float | None:
    """Peak memory above what was in use before the method was built, in MiB: CUDA's allocator
    peak, or on the CPU the resident-set high-water mark (reset through /proc)."""
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        RUNNERS[impl](setup, method, n_batches)
        return (torch.cuda.max_memory_allocated(setup.device) - base) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current resident set
    except OSError:
        return None
    base = proc_status_kib("VmRSS")
    RUNNERS[impl](setup, method, n_batches)
    return (proc_status_kib("VmHWM") - base) / 1024


def memory_probe(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (the CPU allocator keeps freed memory between runs)."""
    setup = make_setup(args, args.models[0])
    setup.copies = False
    impl, method = args.probe
    peak = measure_memory(setup, impl, method, args.memory_batches)
    print(json.dumps({"peak_mib": peak}))


def probe_in_subprocess(args: argparse.Namespace, model: str, impl: str, method: str) -> float | None:
    cmd = [sys.executable, __file__, "--models", model, "--probe", impl, method,
           "--batch-size", str(args.batch_size),
           "--images", str(min(args.images, args.batch_size * args.memory_batches)),
           "--threads", str(args.threads), "--device", args.device, "--precision", args.precision,
           "--memory-batches", str(args.memory_batches)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if lines else None


# --- the comparison -------------------------------------------------------------------------------


def make_setup(args: argparse.Namespace, name: str) -> Setup:
    runtime = set_up(name, args.device, args.threads, args.precision, args.compile)
    model = runtime.loaded.model
    images = load_images(runtime, args.images)
    margin = margin_factor(name, model, images[: args.batch_size])
    lr = default_lr(model, args.batch_size)
    return Setup(name, runtime, model, images, args.batch_size, runtime.device, args.precision, args.compile,
                 margin, lr)


def check_same_parameters(setup: Setup, method: str) -> None:
    """Both loops must adapt the same tensors (the plain one by the authors' names)."""
    tta = build_tta(setup, method)
    if not tta.updates_parameters:
        return
    plain = plain_param_names(copy.deepcopy(setup.model), method)
    if sorted(tta.param_names) != sorted(plain):
        raise SystemExit(f"{setup.name} {method}: tta adapts {len(tta.param_names)} tensors, "
                         f"the plain loop {len(plain)}: {sorted(set(tta.param_names) ^ set(plain))[:6]}")


def compare(args: argparse.Namespace, setup: Setup, method: str) -> dict[str, Any]:
    check_same_parameters(setup, method)
    for impl in RUNNERS:  # warm-up: kernel selection and first-call costs, untimed
        RUNNERS[impl](setup, method, 1)
    times: dict[str, list[float]] = {"plain": [], "tta": []}
    runs: dict[str, Run] = {}
    for rep in range(args.repeats):
        for impl in ("plain", "tta") if rep % 2 == 0 else ("tta", "plain"):
            runs[impl] = RUNNERS[impl](setup, method)
            times[impl].append(runs[impl].seconds)
            print(f"  {setup.name} {method} {impl} rep {rep}: {runs[impl].seconds:.2f} s", file=sys.stderr)
    n = setup.images.shape[0]
    row = {
        "model": setup.name, "method": method, "images": n,
        "plain_ips": n / statistics.median(times["plain"]),
        "tta_ips": n / statistics.median(times["tta"]),
        "plain_seconds": times["plain"], "tta_seconds": times["tta"],
        "ratio_per_rep": [p / t for p, t in zip(times["plain"], times["tta"], strict=True)],
        "same_predictions": float((runs["plain"].preds == runs["tta"].preds).float().mean()),
        "tta_stats": runs["tta"].stats,
    }
    row["speedup"] = row["tta_ips"] / row["plain_ips"]
    return row


def add_memory(args: argparse.Namespace, setup: Setup, row: dict[str, Any]) -> None:
    for impl in RUNNERS:
        if setup.device.type == "cuda":
            row[f"{impl}_peak_mib"] = measure_memory(setup, impl, row["method"], args.memory_batches)
        else:
            row[f"{impl}_peak_mib"] = probe_in_subprocess(args, setup.name, impl, row["method"])


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# --- `tta adapt` on a folder ----------------------------------------------------------------------


def adapt_folder(args: argparse.Namespace) -> dict[str, Any]:
    """Time the whole command (decoding included) on a folder: images/s and data waits."""
    from tta_cli.config import AdaptConfig
    from tta_cli.run import adapt

    model = args.models[0]
    spec = model_spec(model)
    method = args.methods[0]
    runtime = set_up(model)
    margin = margin_factor(model, runtime.loaded.model, load_images(runtime, args.batch_size))
    hyperparameters = {k: v for k, v in shared_hyperparameters(method, 0.0, margin).items() if k != "lr"}
    config = AdaptConfig(inputs=[Path(args.adapt_folder)], model=spec, method=method,
                         pretrained=model.startswith("cifar10-"), batch_size=args.batch_size,
                         device=args.device, out=Path(args.adapt_out), overwrite=True, quiet=True,
                         hyperparameters=hyperparameters, precision=args.precision, compile=args.compile,
                         workers=args.workers)
    record = adapt(config)
    timing = record["timing"]
    return {"model": model, "method": args.methods[0], "images": record["counts"]["images"],
            "images_per_second": timing["images_per_second"], "seconds": timing["seconds"],
            "batches": record["counts"]["batches"],
            "batches_waiting_for_data": timing["batches_waiting_for_data"],
            "data_wait_seconds": timing["data_wait_seconds"],
            "device_idle_share": timing["device_idle_share"], "method_state": record["method_state"],
            "machine": machine()}


def make_jpegs(folder: Path, n: int, size: int = 256) -> None:
    """``n`` JPEG files of ``size`` px: the shared stream's images, upscaled and cycled."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted((shared_dir() / "fixtures" / "fidelity" / "stream").glob("*.png"))
    for i in range(n):
        image = Image.open(files[i % len(files)]).convert("RGB").resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)


# --- whole process against whole process: tta adapt, the authors' SAR, the plain loop --------------


def process_run(impl: str, folder: Path, name: str, batch_size: int, lr: float, out: Path,
                authors: Path | None) -> None:
    """One whole run as the authors' script does it: decode every image first, then adapt batch by
    batch; predictions to ``out`` (JSON). ``impl``: ``authors`` (their sar.py/sam.py) or ``plain``."""
    runtime = set_up(name)
    model = runtime.loaded.model
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = torch.stack([runtime.transform(Image.open(f).convert("RGB")) for f in files])
    if impl == "authors":
        step = authors_sar(model, lr, E0_FACTOR, authors)  # type: ignore[arg-type]
    else:
        step = PlainSAR(model, lr=lr, margin=E0_FACTOR).step
    preds = [step(x).argmax(1) for x in images.split(batch_size)]
    out.write_text(json.dumps(torch.cat(preds).tolist()))


def tta_process(folder: Path, name: str, batch_size: int, lr: float, out: Path, precision: str,
                *extra: str) -> list[str]:
    return [sys.executable, "-m", "tta_cli", "adapt", str(folder), "--model", model_spec(name), "--method",
            "sar", "--batch-size", str(batch_size), "--lr", str(lr), "--precision", precision,
            "--out", str(out), "--overwrite", "--quiet", *extra]


def tta_predictions(out: Path) -> list[int]:
    import csv

    with (out / "predictions.csv").open() as f:
        return [int(row["pred"]) for row in csv.DictReader(f)]


def whole_processes(args: argparse.Namespace) -> dict[str, Any]:
    """tta adapt, the authors' SAR and the plain loop, each a whole process, runs interleaved."""
    name, folder, work = args.models[0], Path(args.folder), Path(args.adapt_out)
    work.mkdir(parents=True, exist_ok=True)
    lr = default_lr(set_up(name).loaded.model, args.batch_size)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if args.process_threads:
        env["OMP_NUM_THREADS"] = str(args.process_threads)
    commands = {
        "tta": tta_process(folder, name, args.batch_size, lr, work / "tta", "fp32"),
        # the authors' script has no source model beside SAR: the same work without tta's reference
        "tta_no_reference": tta_process(folder, name, args.batch_size, lr, work / "tta_no_reference", "fp32",
                                        "--no-source-reference"),
        "authors": [sys.executable, __file__, "--process-run", "authors", "--folder", str(folder),
                    "--models", name, "--batch-size", str(args.batch_size), "--lr", str(lr),
                    "--authors", str(args.authors), "--adapt-out", str(work / "authors.json")],
    }
    commands["plain"] = [*commands["authors"][:3], "plain", *commands["authors"][4:-1], str(work / "plain.json")]
    times: dict[str, list[float]] = {k: [] for k in commands}
    for rep in range(args.repeats):
        order = list(commands) if rep % 2 == 0 else list(reversed(commands))
        for impl in order:
            start = time.perf_counter()
            subprocess.run(commands[impl], env=env, check=True)
            times[impl].append(time.perf_counter() - start)
            print(f"  {impl} rep {rep}: {times[impl][-1]:.1f} s", file=sys.stderr, flush=True)
    preds = {"tta": tta_predictions(work / "tta"), "tta_no_reference": tta_predictions(work / "tta_no_reference"),
             "authors": json.loads((work / "authors.json").read_text()),
             "plain": json.loads((work / "plain.json").read_text())}
    n = len(preds["authors"])
    same = {k: sum(a == b for a, b in zip(preds[k], preds["authors"], strict=True)) / n
            for k in ("tta", "tta_no_reference", "plain")}
    median = {k: statistics.median(v) for k, v in times.items()}
    record = json.loads((work / "tta" / "run.json").read_text())
    return {"model": name, "images": n, "batch_size": args.batch_size, "lr": lr, "seconds": times,
            "median_seconds": median, "tta_vs_authors": median["authors"] / median["tta"],
            "tta_no_reference_vs_authors": median["authors"] / median["tta_no_reference"],
            "tta_vs_plain": median["plain"] / median["tta"],
            "ratio_per_rep": [a / t for a, t in zip(times["authors"], times["tta"], strict=True)],
            "same_predictions_as_authors": same, "tta_timing": record["timing"],
            "tta_threads_env": env.get("OMP_NUM_THREADS"), "machine": machine()}


# --- report ---------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | method | plain img/s | tta img/s | tta / plain (per-rep range) | same preds "
             "| peak MiB plain / tta | used share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = min(r["ratio_per_rep"]), max(r["ratio_per_rep"])
        mem = f"{fmt(r.get('plain_peak_mib'))} / {fmt(r.get('tta_peak_mib'))}"
        used = r["tta_stats"].get("used_share")
        lines.append(f"| {r['model']} | {r['method']} | {r['plain_ips']:.1f} | {r['tta_ips']:.1f} | "
                     f"**{r['speedup']:.2f}x** ({lo:.2f}-{hi:.2f}) | {r['same_predictions']:.3f} | {mem} | "
                     f"{fmt(used, '.2f')} |")
    lines += ["", "| model | SAR / source cost per image (tta) | SAR / source (plain) |", "|---|---|---|"]
    by = {(r["model"], r["method"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        src, sar = by.get((model, "source")), by.get((model, "sar"))
        if src and sar:
            lines.append(f"| {model} | {src['tta_ips'] / sar['tta_ips']:.2f}x | "
                         f"{src['plain_ips'] / sar['plain_ips']:.2f}x |")
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(SHARED_MODELS))
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=256, help="stream length per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISION_DTYPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--memory-batches", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--adapt-folder", help="time `tta adapt` on this folder instead")
    p.add_argument("--adapt-out", default="/tmp/tta-speed-adapt")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--make-jpegs", type=Path, help="write --images JPEG files (256 px) here and stop")
    p.add_argument("--authors", type=Path, help="a checkout of the authors' SAR: the baseline in one process, "
                   "or whole processes on --folder")
    p.add_argument("--folder", help="images for --authors (decoded by each process)")
    p.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--process-threads", type=int, help="OMP_NUM_THREADS for every process of --authors "
                   "(default: unset, each process chooses)")
    p.add_argument("--process-run", help=argparse.SUPPRESS)
    p.add_argument("--probe", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.process_run:
        process_run(args.process_run, Path(args.folder), args.models[0], args.batch_size, args.lr,
                    Path(args.adapt_out), args.authors)
        return
    if args.authors and not args.folder:  # in one process, on the same tensors: their SAR is the baseline
        AUTHORS_CHECKOUT.append(args.authors)
        RUNNERS["plain"] = run_authors
        args.no_memory = True
    elif args.authors:
        result = whole_processes(args)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    torch.set_num_threads(args.threads)
    if args.probe:
        memory_probe(args)
        return
    if args.make_jpegs:
        make_jpegs(args.make_jpegs, args.images)
        return
    if args.adapt_folder:
        result = adapt_folder(args)
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    info = machine()
    rows = []
    for name in args.models:
        setup = make_setup(args, name)
        for method in args.methods:
            row = compare(args, setup, method)
            if not args.no_memory:
                add_memory(args, setup, row)
            rows.append(row)
            print(markdown([row]).splitlines()[2], file=sys.stderr)
    info["load_average_end"] = os.getloadavg()
    result = {"machine": info, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(info))
    print(markdown(rows))


if __name__ == "__main__":
    main()
