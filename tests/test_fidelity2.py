"""tta reproduces the authors' DeYO and MD's LAME and RDumb on the shared fidelity2 fixtures.

Each case runs through ``tta adapt`` with the flags of ``fixtures/fidelity2/README.md`` and must
match the authors' outputs: >= 99.5% identical predictions in order, accuracy within 0.3 points,
and the adapted parameters within the README's bar (SGD: every entry within 1e-4; Adam: within
5e-3 with at most 1% of the entries beyond 1e-4). Other methods' cases live in their own files and
reuse ``Case`` and ``check_case``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.helpers import compare_predictions, csv_rows
from tta_cli.cli import app

pytestmark = pytest.mark.shared

GN, BN, LN = "cifar10-resnet18-gn", "cifar10-resnet18-bn", "cifar10-convnext-atto-ln"


@dataclass(frozen=True)
class Case:
    model: str
    flags: tuple[str, ...]
    optimiser: str = "none"
    """sgd or adam: which parameter bar applies; none: no parameters adapted."""


DEYO = ("--method", "deyo", "--batch-size", "16", "--lr", "0.001", "--seed", "0")
CASES = {
    "source_bn_bs64": Case(BN, ("--method", "source", "--batch-size", "64")),
    "source_ln_bs64": Case(LN, ("--method", "source", "--batch-size", "64")),
    "deyo_gn_bs16_lr1e-3": Case(GN, DEYO, "sgd"),
    "deyo_occ_gn_bs16_lr1e-3": Case(GN, (*DEYO, "--set", "aug=occ", "--set", "occ_size=16",
                                         "--set", "occ_row=8", "--set", "occ_col=8"), "sgd"),
    "deyo_ln_bs16_lr1e-3": Case(LN, (*DEYO, "--set", "layers=all"), "sgd"),
    "lame_bn_bs64": Case(BN, ("--method", "lame", "--batch-size", "64")),
    "lame_knn_bn_bs64": Case(BN, ("--method", "lame", "--batch-size", "64", "--set", "affinity=knn")),
    "rdumb_bn_bs16": Case(BN, ("--method", "rdumb", "--batch-size", "16", "--lr", "0.001",
                               "--set", "reset_every=10"), "adam"),
}


KNOWN_GAPS = {
    "deyo_occ_gn_bs16_lr1e-3": "the case amplifies last-bit differences of the CPU kernels: on an Intel "
                               "AVX-512 machine the authors' own deyo.py lands 1.03e-4 from the reference "
                               "(bar 1e-4) and tta equals it bit for bit; 8.9e-4 on an AMD AVX2 machine "
                               "(docs/METHODS.md)",
}


@pytest.fixture(autouse=True)
def _one_thread(reference_threads: None) -> None:
    """The references were made with 1 thread."""


def run_case(shared: Path, out: Path, case: Case) -> None:
    stream = shared / "fixtures" / "fidelity" / "stream"
    args = ["adapt", str(stream), "--labels", str(stream / "labels.csv"),
            "--model", f"local-dir:{shared / 'models' / case.model}",
            *case.flags, "--precision", "fp32", "--out", str(out), "--quiet", "--workers", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def parameter_gaps(expected: dict[str, torch.Tensor], adapted: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(largest absolute difference, share of entries off by more than 1e-4)."""
    diffs = torch.cat([(adapted[k].float() - v.float()).abs().flatten() for k, v in expected.items()])
    return float(diffs.max()), float((diffs > 1e-4).float().mean())


def check_case(name: str, case: Case, shared: Path, out: Path) -> None:
    reference_dir = shared / "fixtures" / "fidelity2" / "reference"
    run_case(shared, out, case)
    same, acc_ours, acc_ref = compare_predictions(out / "predictions.csv", reference_dir / f"{name}.csv")
    reference = csv_rows(reference_dir / f"{name}.csv")
    worst, share = 0.0, 0.0
    params_file = reference_dir / f"{name}.params.safetensors"
    if params_file.exists():
        worst, share = parameter_gaps(load_file(str(params_file)), load_file(str(out / "model" / "model.safetensors")))
    print(f"{name}: {same:.2%} identical, accuracy {acc_ours:.2%} / {acc_ref:.2%}, "
          f"max parameter difference {worst:.2e} ({share:.3%} beyond 1e-4)")
    assert same >= 0.995, f"{name}: only {same:.2%} of predictions identical"
    if "used" in reference[0]:  # DeYO: the samples that entered each update are the authors'
        ours = csv_rows(out / "predictions.csv")
        used = sum(a["used_for_update"] == b["used"] for a, b in zip(ours, reference, strict=True))
        assert used / len(reference) >= 0.995, f"{name}: only {used} update selections identical"
    assert abs(acc_ours - acc_ref) <= 0.003
    if case.optimiser == "sgd":
        assert worst <= 1e-4, f"{name}: a parameter is {worst:.2e} from the reference"
    elif case.optimiser == "adam":
        assert worst <= 5e-3 and share <= 0.01, f"{name}: parameters {worst:.2e} / {share:.2%} off"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=False)) if n in KNOWN_GAPS else n
    for n in CASES
])
def test_matches_authors_code(name: str, shared: Path, tmp_path: Path) -> None:
    check_case(name, CASES[name], shared, tmp_path / name)
