"""README.md's library example runs as written: its code block is executed with a tiny model in
place of the pretrained one (no weights download) and ``loader`` a few random batches."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import timm
import torch

from tests.helpers import random_inputs

ROOT = Path(__file__).resolve().parents[1]


def library_example(readme: str) -> str:
    """The first indented code block under the ``## Library`` heading."""
    lines = readme.split("## Library", 1)[1].splitlines()[1:]
    block: list[str] = []
    for line in lines:
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line)
        elif block:
            break
    assert block, "no indented code block under ## Library"
    return textwrap.dedent("\n".join(block))


def test_library_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    code = library_example((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "create_method" in code and "loader" in code
    created: list[str] = []
    real_create = timm.create_model

    def tiny(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        created.append(name)
        return real_create("test_resnet", pretrained=False, num_classes=10)

    monkeypatch.setattr(timm, "create_model", tiny)
    namespace: dict[str, object] = {"loader": random_inputs(n_batches=2, batch=4)}
    exec(compile(code, "README.md", "exec"), namespace)
    assert created, "the example creates its model with timm.create_model"
    logits = namespace.get("logits")
    assert isinstance(logits, torch.Tensor) and logits.shape == (4, 10)
