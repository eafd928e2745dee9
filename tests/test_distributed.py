"""Data-parallel adaptation (``tta_cli.distributed``) and ``--per-input`` (``tta_cli.per_input``).

The distributed runs are real: two CPU processes on gloo, started by ``torchrun`` (or by the
environment variables torchrun sets, to see a surviving rank's own error), compared against one
process at the same global batch size, run in this process through the library.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.helpers import csv_rows, make_images, tiny_timm
from tta_cli import distributed
from tta_cli.config import AdaptConfig
from tta_cli.errors import TTAError
from tta_cli.methods import get_method_class, list_methods
from tta_cli.methods.auto import domain_change
from tta_cli.methods.auto.few_classes import FewClasses
from tta_cli.methods.fastpaths import batch_mean, masked_mean
from tta_cli.run import adapt

# --- one process: the helpers are identities, the rows are tensor_split's ------------------------


@pytest.mark.parametrize(("rows", "ranks"), [(64, 2), (7, 2), (5, 3), (1, 2), (0, 2), (10, 4)])
def test_rank_rows_are_tensor_split_parts(rows: int, ranks: int) -> None:
    parts = torch.tensor_split(torch.arange(rows), ranks)
    spans = [distributed.rank_rows(rows, ranks, r) for r in range(ranks)]
    assert [list(range(a, b)) for a, b in spans] == [p.tolist() for p in parts]


def test_rank_items_take_each_global_batch_in_stream_order() -> None:
    items = list(range(11))
    mine = [distributed.rank_items(items, 4, 2, r) for r in range(2)]
    assert mine[0] == [[0, 1], [4, 5], [8, 9]]
    assert mine[1] == [[2, 3], [6, 7], [10]]


def test_collectives_are_identities_in_one_process() -> None:
    values = torch.rand(6)
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_sum(values) is values
    assert distributed.all_sum_with_grad(values) is values
    assert torch.equal(batch_mean(values), values.mean(0))
    mask = values > 0.5
    mean, count = masked_mean(values, mask)
    assert torch.equal(mean, values[mask].sum() / mask.sum().clamp(min=1)) and int(count) == int(mask.sum())
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    distributed.all_reduce_grads([param])
    assert torch.equal(param.grad, torch.full((3,), 2.0))


def test_one_process_needs_no_process_group() -> None:
    assert distributed.launched() == distributed.World() or "WORLD_SIZE" in os.environ
    assert distributed.start("cpu", distributed.World()) == "cpu"
    assert not distributed.active()


@pytest.mark.parametrize(("batch", "video", "says"), [
    (1, False, "below the world size"),
    (8, True, "videos cannot be split"),
])
def test_what_data_parallel_refuses(monkeypatch: pytest.MonkeyPatch, batch: int, video: bool, says: str) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(TTAError, match=says):
        distributed.check_world(batch, "sar", video)
    distributed.check_world(8, "eta", False)  # what it can do passes


def test_every_method_is_data_parallel_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method that cannot run data-parallel declares why (``not_data_parallel``), and the refusal
    says it in one line; no method name is tested outside ``tta_cli.methods``."""
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for name in list_methods():
        method = get_method_class(name)
        if method.data_parallel:
            distributed.check_world(8, name, False)
            continue
        assert method.not_data_parallel, f"{name} refuses data-parallel runs without saying why"
        with pytest.raises(TTAError) as refused:
            distributed.check_world(8, name, False)
        assert method.not_data_parallel in str(refused.value) and "\n" not in str(refused.value)
    assert set(distributed.data_parallel_methods()) >= {*PARALLEL_CASES.values()}


def test_a_refusal_gives_the_methods_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    class Sequential:
        data_parallel = False
        not_data_parallel = "each sample waits for the previous one's update; use --per-input"

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_method_class", lambda name: Sequential)
    with pytest.raises(TTAError, match=r"cannot run data-parallel .*: each sample waits for the previous one's"):
        distributed.check_world(8, "sequential", False)


def test_gathering_and_spans_are_identities_in_one_process() -> None:
    rows = torch.rand(5, 3)
    assert distributed.all_gather_rows(rows) is rows and distributed.row_span(5) == (0, 5)


# --- the methods under two ranks, through the library: one torchrun for all of them ---------------

PARALLEL_CASES = {
    # case: method; the hyperparameters in PARALLEL_CONFIGS make every filter and branch act on the
    # random test model (which is uncertain everywhere)
    "deyo": "deyo", "rotta": "rotta", "lame": "lame", "roid": "roid", "cotta": "cotta", "rdumb": "rdumb",
    "come-tent": "come", "come-sar": "come", "zerosiam": "zerosiam", "foa_shift": "foa_shift",
    "auto-bn": "auto", "auto-gn": "auto", "auto-gn-lame": "auto", "auto-gn-change": "auto",
}
PARALLEL_MODELS = {"auto-gn": "test_efficientnet_gn", "auto-gn-lame": "test_efficientnet_gn",
                   "auto-gn-change": "test_efficientnet_gn"}
"""The cases on another model than ``test_resnet``: auto's guard runs on batch-independent models."""
PARALLEL_CONFIGS: dict[str, dict[str, object]] = {
    # SGD where the method offers it, and a small Adam step for rdumb: Adam moves a parameter whose
    # gradient is float noise (summed in another order over the ranks) by a full step, lr, either way
    "deyo": {"margin_factor": 1.0, "plpd_threshold": 0.0},
    "rotta": {"memory_size": 12, "update_every": 5, "optimizer": "sgd"},  # updates in the middle of batches
    "roid": {"optimizer": "sgd"},
    "cotta": {"confidence_threshold": 1.0, "augmentations": 2, "optimizer": "sgd", "lr": 1e-3},  # augmented teacher
    "rdumb": {"margin_factor": 1.0, "d_margin": 0.9, "reset_every": 2, "lr": 1e-5},
    "come-sar": {"base": "sar", "margin_factor": 1.0},
    # the guard's first window is full after two global batches (14 images) but not after two of
    # one rank's halves, and no judged window is harmful: judged on a rank's rows alone, the
    # second batch would be predicted by the source copy
    "auto-gn": {"inner": "tent", "window": 10, "harm_points": 100.0},
    "auto-gn-lame": {"inner": "tent", "window": 10, "harm_points": 100.0},  # every batch given to LAME
    "auto-gn-change": {"inner": "tent", "window": 10, "harm_points": 100.0},  # a domain change at batch 1
}
DOMAIN_CHANGE_EVERYWHERE = {"WARM_IMAGES": 1, "MIN_TEST_IMAGES": 1, "MIN_CLASS_IMAGES": 1, "Z_CHANGE": -1.0}
"""auto-gn-change: the detector tests every batch once its segment holds residuals (from the third
on: the first gives the class means, the second the residuals) and finds a change in each."""
_few_classes_add = FewClasses.add
PARALLEL_STREAM = (7, 7, 1)
"""Global batch sizes: 4 + 3 rows on two ranks, then a batch where rank 1 has no row."""


def _parallel_run(case: str, ranks: int, rank: int) -> dict[str, object]:
    """One method on this rank's rows of every batch of a fixed stream, on ``test_resnet`` (BatchNorm
    on batch statistics): its outputs per batch and its adapted state."""
    from tta_cli.methods import create_method

    generator = torch.Generator().manual_seed(1)
    sizes = (7, *PARALLEL_STREAM) if case == "auto-gn-change" else PARALLEL_STREAM
    stream = [torch.randn(n, 3, 32, 32, generator=generator) * 2 for n in sizes]
    clean = torch.randn(6, 3, 32, 32, generator=generator)
    name = PARALLEL_CASES[case]
    learns = hasattr(get_method_class(name).config_class(), "lr")
    options = {"lr": 0.01} if learns else {}
    method = create_method(name, tiny_timm(PARALLEL_MODELS.get(case, "test_resnet")), batch_size=PARALLEL_STREAM[0],
                           **(options | PARALLEL_CONFIGS.get(case, {})))
    if get_method_class(name).clean_data:
        method.prepare([clean])  # foa_shift's source mean (every rank: the whole clean set)
    method.reseed(0)
    logits, used = [], []
    every_batch = mock.patch.object(FewClasses, "add", lambda self, pred, batch: _few_classes_add(self, pred, batch)
                                    or True) if case == "auto-gn-lame" else contextlib.nullcontext()
    with every_batch, contextlib.ExitStack() as patches:
        for constant, value in DOMAIN_CHANGE_EVERYWHERE.items() if case == "auto-gn-change" else ():
            patches.enter_context(mock.patch.object(domain_change, constant, value))
        for x in stream:
            start, stop = distributed.rank_rows(x.shape[0], ranks, rank)
            result = method.step(x[start:stop])
            logits.append(result.logits.detach())
            used.append(result.used)
    method.settle()
    return {"logits": logits, "used": used, "state": method.adapted_state_dict() | _stream_state(method),
            "resets": method.resets, "decisions": _decisions(method) if name == "auto" else []}


def _stream_state(method: object) -> dict[str, torch.Tensor]:
    """auto's stream statistics on BatchNorm models (a frozen copy's buffers), as ``stream.*``."""
    stream = getattr(method, "stream_model", None)
    return {f"stream.{k}": v.clone() for k, v in stream.state_dict().items()} if stream is not None else {}


def _decisions(method: object) -> list[object]:
    """auto's decisions on the whole batch: where its source check left candidates out, and where
    its guard fell back to the source, reset or froze."""
    stats = method.stats()  # type: ignore[attr-defined]
    return [[(f["batch"], f["left_out"]) for f in stats.get("fallback_batches", [])],
            stats.get("guard_fallbacks"), stats.get("guard_harm_resets"), stats.get("guard_events"),
            stats.get("lame_batches"), stats.get("domain_changes")]


def parallel_worker(out: str) -> None:
    """Each rank of a torchrun: every case of ``PARALLEL_CASES``, saved to ``out/CASE.RANK.pt``."""
    distributed.start("cpu")
    try:
        for case in PARALLEL_CASES:
            torch.save(_parallel_run(case, distributed.world_size(), distributed.rank()),
                       Path(out) / f"{case}.{distributed.rank()}.pt")
    finally:
        distributed.stop()


def test_the_methods_under_two_ranks_equal_one_process(tmp_path: Path, one_thread: None) -> None:
    """deyo, rotta, lame, roid, cotta, rdumb, come, zerosiam, foa_shift and auto on two gloo ranks
    give one process's predictions, used samples, adapted state (parameters and BatchNorm statistics,
    auto's stream statistics) and auto's decisions at the same global batch, on a BatchNorm model
    (auto: also a GroupNorm one) with a batch one rank has no row of."""
    code = f"from tests.test_distributed import parallel_worker; parallel_worker({str(tmp_path)!r})"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--no-python", sys.executable, "-c", code]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in PARALLEL_CASES:
        one = _parallel_run(case, 1, 0)
        if case == "auto-gn-change":  # the inner method was reset before batch 2, on every rank alike
            assert one["decisions"][-1] == [2]
        two = [torch.load(tmp_path / f"{case}.{rank}.pt", weights_only=True) for rank in range(2)]
        for batch, logits in enumerate(one["logits"]):
            merged = torch.cat([part["logits"][batch] for part in two])
            assert torch.equal(merged.argmax(1), logits.argmax(1)), (case, batch)
            assert float((merged - logits).abs().max()) < 1e-4, (case, batch)
            assert torch.equal(torch.cat([part["used"][batch] for part in two]), one["used"][batch]), (case, batch)
        for part in two:
            assert part["resets"] == one["resets"], case
            assert part["decisions"] == one["decisions"], case
            assert part["state"].keys() == one["state"].keys()
            difference = max(float((part["state"][k].float() - v.float()).abs().max())
                             for k, v in one["state"].items())
            assert difference <= 1e-4, (case, difference)


# --- two processes on gloo --------------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | extra


def torchrun_adapt(*args: str | Path, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "--no-python", sys.executable, "-m", "tta_cli", "adapt", *map(str, args),
               "--device", "cpu", "--workers", "0", "-q"]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def _local(inputs: list[Path], model: str, method: str, batch: int, out: Path, **options: object) -> dict:
    config = AdaptConfig(inputs=inputs, model=model, method=method, batch_size=batch, device="cpu", workers=0,
                         out=out, quiet=True, **options)  # type: ignore[arg-type]
    return adapt(config)


def _params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next((out / "model").glob("*.safetensors"))))


def assert_same_run(one: Path, two: Path, adam: bool = False) -> str:
    """Identical predictions (>= 99.5%, in order), parameters within 1e-4, one set of outputs;
    returns what was measured, in one line (docs/DISTRIBUTED.md's table).

    ``adam``: Adam's step is about lr whatever the gradient's size, so a parameter whose gradient is
    float noise (summed over the ranks in another order) moves by up to lr either way; there the bar
    is the fidelity tests' Adam bar (every entry within 5e-3, at most 1% beyond 1e-4) and the
    entropies within 1e-2 (BatchNorm on half a batch would be off by far more)."""
    rows1, rows2 = csv_rows(one / "predictions.csv"), csv_rows(two / "predictions.csv")
    assert [r["path"] for r in rows1] == [r["path"] for r in rows2]
    assert [r["index"] for r in rows1] == [r["index"] for r in rows2]
    same = sum(a["pred"] == b["pred"] for a, b in zip(rows1, rows2, strict=True))
    # the source reference: each rank predicts its rows of the same batches, rank 0 writes them all
    assert "source_pred" in rows2[0]
    same_source = sum(a["source_pred"] == b["source_pred"] for a, b in zip(rows1, rows2, strict=True))
    assert same_source >= 0.995 * len(rows1)
    entropy = max(abs(float(a["entropy"]) - float(b["entropy"])) for a, b in zip(rows1, rows2, strict=True))
    p1, p2 = _params(one), _params(two)
    assert p1.keys() == p2.keys()
    gaps = torch.cat([(p1[k].float() - p2[k].float()).abs().reshape(-1) for k in p1])
    difference, beyond = float(gaps.max()), int((gaps > 1e-4).sum())
    r1, r2 = json.loads((one / "run.json").read_text()), json.loads((two / "run.json").read_text())
    measured = (f"identical predictions {same} / {len(rows1)}, max parameter difference {difference:.1e} "
                f"({beyond} of {gaps.numel()} entries beyond 1e-4), max entropy difference {entropy:.1e}, "
                f"filters {r1['counts']['after_each_filter']} / {r2['counts']['after_each_filter']}")
    assert same >= 0.995 * len(rows1), measured
    # the same statistics: BatchNorm on half a batch would be far off
    assert entropy < (1e-2 if adam else 1e-3), measured
    assert (difference <= 5e-3 and beyond <= 0.01 * gaps.numel()) if adam else difference <= 1e-4, measured
    assert (r1["world_size"], r2["world_size"]) == (1, 2)
    assert r2["status"] == "completed"
    for key in ("images", "used_for_update", "after_each_filter", "batches"):
        assert r1["counts"][key] == r2["counts"][key], key
    assert r1["resets_at_batch"] == r2["resets_at_batch"]
    assert r1["health"]["verdict"] == r2["health"]["verdict"], (r1["health"], r2["health"])
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    return measured


def _linked(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        (folder / file.name).symlink_to(file)
    return folder


@pytest.fixture(scope="module")
def fidelity(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first 128 (and 129) images of the fidelity stream and 64 clean images, as folders."""
    root = tmp_path_factory.mktemp("fidelity")
    stream = sorted((shared / "fixtures/fidelity/stream").glob("*.png"))
    clean = sorted((shared / "fixtures/fidelity/clean").glob("*.png"))
    return {"s128": _linked(root / "s128", stream[:128]), "s129": _linked(root / "s129", stream[:129]),
            "clean": _linked(root / "clean", clean[:64]), "models": shared / "models"}


CASES: dict[str, tuple[str, str, int, str, dict]] = {
    # name: (model, method, batch, stream, options: lr, clean, set: other hyperparameters, adam: the
    # Adam bar of assert_same_run)
    "sar-gn": ("cifar10-resnet18-gn", "sar", 16, "s128", {"lr": "0.001"}),
    "eata-gn-clean": ("cifar10-resnet18-gn", "eata", 16, "s128", {"lr": "0.001", "clean": True}),
    "tent-bn": ("cifar10-resnet18-bn", "tent", 32, "s128", {}),
    # 129 = 4 x 32 + 1: in the last batch rank 1 has no row and still takes part
    "sar-bn-short-last-batch": ("cifar10-resnet18-bn", "sar", 32, "s129", {}),
    # the methods made data-parallel later, with their fidelity cases' settings where they have one
    "deyo-gn": ("cifar10-resnet18-gn", "deyo", 16, "s128", {"lr": "0.001"}),
    "deyo-bn": ("cifar10-resnet18-bn", "deyo", 32, "s129", {"lr": "0.001"}),
    "rotta-bn": ("cifar10-resnet18-bn", "rotta", 16, "s128", {"adam": True}),
    "lame-bn": ("cifar10-resnet18-bn", "lame", 64, "s129", {}),
    "roid-bn": ("cifar10-resnet18-bn", "roid", 64, "s128", {"adam": True}),
    "roid-bn-sgd": ("cifar10-resnet18-bn", "roid", 32, "s128", {"lr": "0.001", "set": {"optimizer": "sgd"}}),
    "cotta-bn": ("cifar10-resnet18-bn", "cotta", 64, "s128", {"adam": True, "set": {"augmentations": 8}}),
    "cotta-bn-sgd": ("cifar10-resnet18-bn", "cotta", 64, "s128",
                     {"lr": "0.001", "set": {"augmentations": 8, "optimizer": "sgd"}}),
    "rdumb-bn": ("cifar10-resnet18-bn", "rdumb", 16, "s128", {"adam": True, "set": {"reset_every": 3}}),
    "come-bn": ("cifar10-resnet18-bn", "come", 32, "s128", {}),
    "come-sar-gn": ("cifar10-resnet18-gn", "come", 16, "s128", {"lr": "0.001", "set": {"base": "sar"}}),
    "zerosiam-gn": ("cifar10-resnet18-gn", "zerosiam", 16, "s128", {"lr": "0.001"}),
    "foa_shift-bn": ("cifar10-resnet18-bn", "foa_shift", 32, "s129", {"clean": True}),
    "auto-bn": ("cifar10-resnet18-bn", "auto", 32, "s129", {}),
    "auto-gn": ("cifar10-resnet18-gn", "auto", 16, "s128", {}),
}


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(case: str, fidelity: dict[str, Path], tmp_path: Path, one_thread: None) -> None:
    model_name, method, batch, stream, options = CASES[case]
    model = f"local-dir:{fidelity['models'] / model_name}"
    flags: list[str | Path] = []
    hyperparameters: dict[str, object] = {}
    clean = None
    if "lr" in options:
        flags += ["--lr", options["lr"]]
        hyperparameters["lr"] = float(options["lr"])
    if options.get("clean"):
        clean = fidelity["clean"]
        flags += ["--clean", clean]
    for key, value in options.get("set", {}).items():
        flags += ["--set", f"{key}={value}"]
        hyperparameters[key] = value
    _local([fidelity[stream]], model, method, batch, tmp_path / "one", hyperparameters=hyperparameters, clean=clean)
    done = torchrun_adapt(fidelity[stream], "--model", model, "--method", method, "-b", str(batch), *flags,
                          "--out", tmp_path / "two")
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"{case}: {assert_same_run(tmp_path / 'one', tmp_path / 'two', options.get('adam', False))}")  # -s shows


@pytest.mark.slow
def test_a_crashed_rank_stops_the_others_with_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 1 exits abruptly after two batches; rank 0 stops with one line, and run.json says the
    run failed. The ranks are started as torchrun starts them (its environment variables),
    so that rank 0's own message is seen (torchrun would stop it from outside)."""
    make_images(tmp_path / "images", 24)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tta_cli", "adapt", str(tmp_path / "images"), "--model",
               f"local-dir:{tiny_model_dir}", "--method", "tent", "-b", "4", "--device", "cpu",
               "--workers", "0", "-q", "--out", str(tmp_path / "out")]
    ranks = [subprocess.Popen(command, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                                TTA_DIST_TIMEOUT="60", TTA_FAULT_EXIT_AFTER="1:2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=300) for p in ranks]
    assert ranks[1].returncode == 17  # the fault hook
    assert ranks[0].returncode == 3, results[0][1][-2000:]
    message = results[0][1].strip().splitlines()
    assert len(message) == 1 and "another rank failed" in message[0] and "Traceback" not in results[0][1]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["status"] == "failed" and "another rank failed" in record["reason"]


@pytest.mark.slow
def test_per_input_equals_separate_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two folders under torchrun: rank 0 adapts one, rank 1 the other, each from the source model;
    each sub-folder equals a separate run of that folder."""
    cams = [tmp_path / "cam_a", tmp_path / "cam_b"]
    for seed, cam in enumerate(cams):
        make_images(cam, 12, seed=seed)
    model = f"local-dir:{tiny_model_dir}"
    done = torchrun_adapt(*cams, "--model", model, "--method", "tent", "-b", "4",
                          "--per-input", "--out", tmp_path / "fleet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "fleet").iterdir()) == ["cam_a", "cam_b"]
    for cam in cams:
        _local([cam], model, "tent", 4, tmp_path / "alone" / cam.name)
        one, fleet = tmp_path / "alone" / cam.name, tmp_path / "fleet" / cam.name
        assert [r["pred"] for r in csv_rows(one / "predictions.csv")] == \
            [r["pred"] for r in csv_rows(fleet / "predictions.csv")]
        p1, p2 = _params(one), _params(fleet)
        assert max(float((p1[k] - p2[k]).abs().max()) for k in p1) <= 1e-6
        assert json.loads((fleet / "run.json").read_text())["world_size"] == 1


def test_per_input_without_torchrun_runs_each_input(tiny_model_dir: Path, tmp_path: Path, one_thread: None) -> None:
    from tta_cli.per_input import adapt_each

    cams = [tmp_path / "a", tmp_path / "b"]
    for seed, cam in enumerate(cams):
        make_images(cam, 4, seed=seed)
    config = AdaptConfig(inputs=cams, model=f"local-dir:{tiny_model_dir}", method="tent",
                         batch_size=2, device="cpu", workers=0, out=tmp_path / "out", quiet=True)
    records = adapt_each(config)
    assert [Path(r["out"]).name for r in records] == ["a", "b"]
    assert [len(csv_rows(tmp_path / "out" / n / "predictions.csv")) for n in "ab"] == [4, 4]


def test_per_input_refuses_two_inputs_with_one_name(tmp_path: Path) -> None:
    from tta_cli.per_input import input_names

    with pytest.raises(TTAError, match="both write"):
        input_names([tmp_path / "x" / "cam", tmp_path / "y" / "cam"])
