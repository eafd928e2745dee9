"""Every command's ``--help``, as a newcomer reads it in an 80-column terminal: plain metavars, the
options grouped in panels, examples at the end, no markup shown as text."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from tta_cli.cli import app
from tta_cli.cli.help import EXAMPLES, flowing
from tta_cli.cli.options import PANELS

COMMANDS = ["adapt", "predict", "report", "methods", "models", "corrupt", "bench"]
TYPER_INTERNALS = ("<list[", "<str>", "<bool>", "<int", "<float>", "<path>", "range>", "[x>=", "[x<=", "{")
runner = CliRunner()


def render(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def _command(name: str) -> typer.core.TyperCommand:
    group = typer.main.get_command(app)
    return group.commands[name]  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_no_typer_internals_nor_markup(command: str) -> None:
    text = render(command)
    for token in (*TYPER_INTERNALS, "``", "[bold]"):
        assert token not in text, f"{command} --help shows {token!r}:\n{text}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_ends_with_examples(command: str) -> None:
    text = render(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Examples" in text
    tail = text[text.index("Examples"):]
    for _, line in EXAMPLES[command]:
        assert line.split()[0] + " " + line.split()[1] in tail


def test_root_help_is_plain_and_has_examples() -> None:
    text = render()
    for token in TYPER_INTERNALS:
        assert token not in text
    assert "Examples" in text and "tta adapt sample_data/stream" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_value_names_a_plain_metavar_and_a_panel(command: str) -> None:
    for param in _command(command).params:
        if isinstance(param, typer.core.TyperArgument) or param.hidden:
            continue
        assert param.rich_help_panel in PANELS, f"{command} {param.opts} has no panel"  # type: ignore[attr-defined]
        if not param.is_flag:  # type: ignore[attr-defined]
            assert param.metavar and param.metavar == param.metavar.upper(), f"{command} {param.opts}"


def test_adapt_panels_come_in_order() -> None:
    text = render("adapt")
    positions = [text.index(f"─ {panel} ─") for panel in PANELS]
    assert positions == sorted(positions)
    assert "─ Options ─" not in text  # --help itself is filed in the last panel


def test_usage_lines_name_arguments_as_click_does() -> None:
    assert "predict [OPTIONS] INPUTS..." in render("predict")
    assert re.search(r"adapt \[OPTIONS\] \[INPUTS(\]\.\.\.|\.\.\.\])", render("adapt"))  # typer 0.29 / 0.24
    assert "corrupt [OPTIONS] SRC DST" in render("corrupt")


def test_help_paragraphs_flow() -> None:
    assert flowing("One\n    line.\n\n    Two\n    lines.") == "One line.\n\nTwo lines."


def test_range_checks_stay_usage_errors() -> None:
    result = runner.invoke(app, ["adapt", "x", "-m", "m", "--batch-size", "0"])
    assert result.exit_code == 2 and "must be an integer >= 1, got 0" in result.output
    result = runner.invoke(app, ["adapt", "x", "-m", "m", "--seed", str(2**32)])
    assert result.exit_code == 2 and "--seed" in result.output
