"""The registry and hyperparameter checking: every invalid ``--set`` value is one clear TTAError."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest
from typer.testing import CliRunner

from tests.helpers import tiny_timm
from tta_cli.cli import app, main
from tta_cli.errors import TTAError
from tta_cli.methods import create_method, get_method_class, list_methods, method_config

BAD_VALUES = [
    ("sar", "reliable_rows", "maybe", "auto, off"),
    ("sar", "layers", "last", "sar, all"),
    ("eta", "reliable_rows", "yes", "auto, off"),
    ("tent", "bn_stats", "running", "auto, batch, source, mix, ema"),
    ("sar", "skip_empty", "perhaps", "true or false"),
    ("tent", "steps", "0", ">= 1"),
    ("tent", "steps", "1.5", "an integer"),
    ("tent", "lr", "-0.001", "> 0"),
    ("tent", "lr", "nan", "> 0"),
    ("tent", "lr", "fast", "a number"),
    ("sar", "margin_factor", "inf", "finite"),
    ("eata", "d_margin", "nan", "finite"),
    ("norm", "bn_alpha", "1.5", "<= 1"),
    ("tent", "momentum", "1", "< 1"),
]


def test_builtin_methods_are_registered_with_aliases() -> None:
    assert {"source", "norm", "tent", "eta", "eata", "sar"} <= set(list_methods())
    assert get_method_class("bn").name == "norm"
    assert get_method_class("SAR").name == "sar"


def test_unknown_method_suggests_close_names() -> None:
    with pytest.raises(TTAError, match="did you mean sar"):
        get_method_class("sr")


def test_strings_are_parsed_to_the_field_types() -> None:
    config = method_config("sar", lr="0.01", steps="2", skip_empty="yes", reliable_rows="off", rho="0")
    assert (config.lr, config.steps, config.skip_empty, config.reliable_rows, config.rho) == (0.01, 2, True, "off",
                                                                                              0.0)
    assert method_config("tent", lr="none").lr is None


@pytest.mark.parametrize(("name", "key", "value", "expected"), BAD_VALUES)
def test_invalid_values_name_what_is_valid(name: str, key: str, value: str, expected: str) -> None:
    with pytest.raises(TTAError) as err:
        method_config(name, **{key: value})
    assert key in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_lists_the_valid_ones() -> None:
    with pytest.raises(TTAError, match=r"unknown hyperparameter rhoo.*valid: .*rho"):
        method_config("sar", rhoo="0.1")


def test_create_method_checks_keyword_and_config_values() -> None:
    with pytest.raises(TTAError, match="reliable_rows"):
        create_method("sar", tiny_timm("test_vit"), batch_size=8, reliable_rows="maybe")
    config = method_config("sar")
    config.steps = 0  # a dataclass built by hand is checked too
    with pytest.raises(TTAError, match="steps"):
        create_method("sar", tiny_timm("test_vit"), config, batch_size=8)


@pytest.mark.parametrize("name", list_methods())
def test_every_choice_field_is_a_literal_and_its_values_are_accepted(name: str) -> None:
    config_class = get_method_class(name).config_class
    hints = get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        if field.name in ("bn_stats", "reliable_rows", "layers"):
            assert get_origin(hints[field.name]) is Literal, f"{name}.{field.name} is not a Literal"
        if get_origin(hints[field.name]) is Literal:
            for choice in get_args(hints[field.name]):
                assert getattr(method_config(name, **{field.name: choice}), field.name) == choice


@pytest.mark.parametrize("name", list_methods())
def test_defaults_pass_the_checks(name: str) -> None:
    method_config(name)


def _adapt_args(tiny_model_dir: Path, image_folder: Path, out: Path, *extra: str) -> list[str]:
    return ["adapt", str(image_folder), "--model", f"local-dir:{tiny_model_dir}", "--method", "sar",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--quiet", *extra]


def test_cli_set_with_an_invalid_value_is_a_user_error(tiny_model_dir: Path, image_folder: Path,
                                                       tmp_path: Path) -> None:
    args = _adapt_args(tiny_model_dir, image_folder, tmp_path / "run", "--set", "reliable_rows=maybe")
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, TTAError)
    assert "reliable_rows" in str(result.exception) and "auto, off" in str(result.exception)


def test_cli_set_with_an_invalid_value_exits_2_with_one_line(tiny_model_dir: Path, image_folder: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    args = _adapt_args(tiny_model_dir, image_folder, tmp_path / "run", "--set", "reliable_rows=maybe")
    monkeypatch.setattr(sys, "argv", ["tta", *args])
    monkeypatch.delenv("TTA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tta: error: invalid value 'maybe' for reliable_rows") and "auto, off" in lines[0]
    assert "unexpected" not in lines[0] and "Traceback" not in lines[0]


def test_a_second_method_with_a_taken_name_is_refused() -> None:
    from tta_cli.methods import TTAMethod, register_method

    class Impostor(TTAMethod):
        name = "sar"

    with pytest.raises(ValueError, match=r"'sar'.*taken by tta_cli\.methods\.sar\.SAR"):
        register_method(Impostor)
    assert get_method_class("sar").__module__ == "tta_cli.methods.sar"
    register_method(get_method_class("sar"))  # the same class again (a reload) is no conflict


def test_methods_declare_what_the_set_up_layer_needs() -> None:
    """Clean data, data-parallel support and being the source model are declared on the method, so
    that no code outside ``tta_cli.methods`` tests a method's name."""
    with_clean = [n for n in list_methods() if get_method_class(n).clean_data]
    assert with_clean == ["eata", "foa_shift"] and get_method_class("eata").without_clean_data == "eta"
    assert get_method_class("foa_shift").without_clean_data == "source"
    parallel = {n for n in list_methods() if get_method_class(n).data_parallel}
    assert parallel == {"source", "norm", "tent", "sar", "eta", "eata", "come", "deyo", "rotta", "lame", "roid",
                        "cotta", "rdumb", "zerosiam", "foa_shift", "auto"}
    assert all(get_method_class(n).not_data_parallel for n in list_methods() if n not in parallel)
    assert [n for n in list_methods() if not get_method_class(n).changes_predictions] == ["source"]
