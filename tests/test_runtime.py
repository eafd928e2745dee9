"""The run set-up shared by ``tta adapt`` and ``tta bench``: both give the same predictions for the
same model, stream and method; seeding, threads, the EATA fallback, the Fisher pass, the out folder."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from tests.helpers import csv_rows, invoke, make_class_folders
from tta_cli.bench.progress import BenchProgress
from tta_cli.bench.runner import CleanDataCache, parse_methods, run_one
from tta_cli.bench.settings import BenchStream
from tta_cli.errors import TTAError
from tta_cli.outputs import BatchOutputs
from tta_cli.runtime import (
    cpu_threads,
    method_name,
    prepare_out_dir,
    seed_everything,
    start_run,
)
from tta_cli.sources.folder import folder_items

pytestmark = pytest.mark.usefixtures("one_thread")


class Predictions:
    def __init__(self) -> None:
        self.keys: list[str] = []
        self.preds: list[int] = []

    def on_batch(self, out: BatchOutputs) -> None:
        self.keys += [item.key for item in out.batch.items]
        self.preds += [int(p) for p in out.pred]


@pytest.fixture(scope="module")
def labelled_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("runtime") / "set", per_class=2)


@pytest.mark.parametrize("method", ["sar", "eata"])
def test_adapt_and_bench_give_the_same_predictions(method: str, labelled_set: Path, tiny_model_dir: Path,
                                                   tmp_path: Path) -> None:
    model = f"local-dir:{tiny_model_dir}"
    out = tmp_path / "adapt"
    result = invoke("adapt", labelled_set, "--model", model, "--method", method, "--batch-size", "4",
                    "--lr", "0.05", "--set", "margin_factor=1.0", "--clean", labelled_set,
                    "--workers", "0", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    adapted = csv_rows(out / "predictions.csv")

    setup = start_run(model, seed=0)
    items = folder_items(labelled_set, setup.loaded.class_names)
    stream = BenchStream("mild", "none", items, batch_size=4)
    spec = parse_methods(f"{method}:lr=0.05:margin_factor=1.0")[0]
    clean = CleanDataCache(setup, items)
    sink = Predictions()
    with BenchProgress(Console(quiet=True), 1, quiet=True) as progress:
        run, _ = run_one(stream, spec, setup, setup.batches(items, 4), clean, progress, seed=0, sinks=[sink])

    assert sink.keys == [r["path"] for r in adapted]
    assert sink.preds == [int(r["pred"]) for r in adapted]
    assert run.correct == sum(r["correct"] == "1" for r in adapted)
    assert run.used_share > 0 and len(set(sink.preds)) > 1  # it adapted, and on varied predictions


def test_fisher_is_computed_once_per_batch_size(labelled_set: Path, tiny_model_dir: Path) -> None:
    setup = start_run(f"local-dir:{tiny_model_dir}")
    items = folder_items(labelled_set, setup.loaded.class_names)[:8]
    cache = CleanDataCache(setup, items)
    first = cache.get("eata", 4, {})
    assert first and cache.get("eata", 4, {}) is first
    assert cache.get("eata", 2, {}) is not first
    source = dict(setup.loaded.model.named_parameters())
    for name, (fisher, anchor) in first.items():
        assert (fisher >= 0).all() and torch.equal(anchor, source[name].detach())  # the source model is untouched
    eata = setup.build_method("eata", {}, 4, first, fresh_copy=True)
    assert eata.fishers is not None and eata.fishers.keys() == first.keys()
    name = next(iter(first))
    assert eata.fishers[name][0] is not first[name][0]  # runs get copies


def test_seed_everything_seeds_python_numpy_and_torch() -> None:
    seed_everything(3)
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    seed_everything(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_eata_without_clean_images_is_eta() -> None:
    assert method_name("EATA", has_clean=False) == "eta"
    assert method_name("eata", has_clean=True) == "eata"
    assert method_name("sar", has_clean=False) == "sar"


def test_threads_are_pinned_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_threads(1) is False and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(None) is False
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(None) is True


def test_out_folder_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TTAError, match="not a folder"):
        prepare_out_dir(tmp_path / "file", overwrite=False)
    busy = tmp_path / "busy"
    (busy / "data").mkdir(parents=True)
    prepare_out_dir(busy, overwrite=False, ignore=("data",))
    (busy / "results.csv").write_text("")
    with pytest.raises(TTAError, match="not empty"):
        prepare_out_dir(busy, overwrite=False, ignore=("data",))
    prepare_out_dir(busy, overwrite=True)


def test_unknown_precision_fails_before_loading() -> None:
    from tta_cli.runtime import SpeedOptions

    with pytest.raises(TTAError, match="unknown precision"):
        start_run("no-such-model", speed=SpeedOptions(precision="fp8"))


def test_a_method_without_its_clean_images_says_what_runs_instead() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    assert method_name("eata", has_clean=False, console=console) == "eta"
    assert "eata without --clean: no Fisher regulariser, running eta" in console.export_text()
