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


def readme_test_command(readme: str) -> str:
    """The indented command after "Install and run the tests"."""
    after = readme.split("Install and run the tests", 1)[1]
    return next(line.strip() for line in after.splitlines() if line.startswith("    "))


def test_ci_runs_the_readme_test_command_in_a_new_venv() -> None:
    command = readme_test_command((ROOT / "README.md").read_text(encoding="utf-8"))
    assert command.startswith("pip install") and "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    assert command in lines, "the README's test command, word for word"
    venv_at = next(i for i, line in enumerate(lines) if "-m venv" in line)
    activate_at = next(i for i, line in enumerate(lines) if line.startswith("source") and "activate" in line)
    assert venv_at < activate_at < lines.index(command), "a new virtual environment, activated before the command"


def test_test_extra_installs_the_bench_tools() -> None:
    """The tests import scipy, corrupt-tta and matplotlib (the bench tools): the test extra installs them."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    test_extra = project["optional-dependencies"]["test"]
    assert any(req.replace(" ", "").startswith("tta-cli[bench") for req in test_extra)
