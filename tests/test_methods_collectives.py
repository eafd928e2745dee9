"""The methods' door to data-parallel sums (``tta_cli.methods.collectives``)."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from tests.conftest import ROOT
from tta_cli.methods import collectives


def test_one_process_sums_are_the_local_values() -> None:
    world = collectives.world()
    values = torch.rand(5, 3, 2, 2)
    assert not world.active and world.is_main()
    assert world.sum(values) is values and world.sum_with_grad(values) is values and world.sum_int(7) == 7
    mean, var, count = world.channel_stats(values)
    assert torch.allclose(mean, values.mean((0, 2, 3))) and count == 20
    assert torch.allclose(var, values.var((0, 2, 3), unbiased=False))


def test_one_process_holds_the_whole_batch() -> None:
    world = collectives.world()
    rows = torch.rand(5, 3)
    assert world.gather_rows(rows) is rows and world.row_span(5) == (0, 5) and world.part(9) == (0, 9)


def test_use_installs_collectives_for_every_method() -> None:
    class Doubling(collectives.OneProcess):
        active = True

        def sum(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor * 2

    from tta_cli.methods.fastpaths import masked_mean

    values, mask = torch.ones(4), torch.tensor([True, True, False, False])
    collectives.use(Doubling())
    try:
        mean, count = masked_mean(values, mask)  # the local sum over the global (doubled) count
        assert float(mean) == 0.5 and int(count) == 2
    finally:
        collectives.use(None)
    assert not collectives.world().active


def test_methods_import_nothing_of_the_run_layer() -> None:
    """No method module imports distributed, the sinks, the monitor or the run."""
    banned = ("tta_cli.distributed", "tta_cli.sinks", "tta_cli.monitor", "tta_cli.run")
    for path in (ROOT / "tta_cli" / "methods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module == "tta_cli":
                names = [f"tta_cli.{a.name}" for a in node.names]
            assert not any(n.startswith(banned) for n in names), f"{Path(path).name} imports {names}"
