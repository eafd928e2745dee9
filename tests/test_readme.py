"""README.md tells the truth: its library example runs as written, against ``sample_data/`` with
the loader it builds; its methods table lists every registered method; the tests it names run in CI."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from tta_cli.methods import list_methods

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


def test_library_example_runs_as_written_on_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    code = library_example(README.read_text(encoding="utf-8"))
    assert "create_method" in code and "loader =" in code  # the example builds its own loader
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    logits = namespace.get("logits")
    assert isinstance(logits, torch.Tensor) and logits.shape == (64, 10)
    assert len(namespace["loader"]) == 5  # type: ignore[arg-type]  # 320 images in batches of 64


def _methods_table(readme: str) -> list[str]:
    section = readme.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [name.strip("` ") for row in rows for name in row.split("|")[1].replace("(**default**)", "").split("/")]


def test_readme_methods_table_lists_every_method_and_marks_the_default() -> None:
    readme = README.read_text(encoding="utf-8")
    assert sorted(_methods_table(readme)) == list_methods()
    assert "| `auto` (**default**) |" in readme


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


def test_the_quick_start_prints_the_sentence_the_readme_quotes(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    import shlex

    from typer.testing import CliRunner

    from tta_cli.cli import app

    readme = README.read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1]
    command = next(line.strip() for line in quick.splitlines() if "tta adapt" in line)
    args = shlex.split(command.split("&&", 1)[1])[1:]  # after "pip install . &&" and "tta"
    args[args.index("--out") + 1] = str(tmp_path / "sample")
    quoted = quick.split("ends with one sentence:", 1)[1].split("\n\n")[1]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, [*args, "--workers", "0"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert " ".join(quoted.split()) in " ".join(result.output.split())
