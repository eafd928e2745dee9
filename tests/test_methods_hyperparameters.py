"""``tta_cli.methods.hyperparameters``: every number a method takes has a range, and a value outside
it is one line and exit 2, never a crash inside the method."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tta_cli.errors import TTAError
from tta_cli.methods import list_methods, method_config
from tta_cli.methods.hyperparameters import _field_type, parse_overrides


def _config_class(method: str) -> type:
    config = method_config(method)
    return config if isinstance(config, type) else type(config)


@pytest.mark.parametrize("method", list_methods())
def test_every_number_of_every_method_has_bounds(method: str) -> None:
    cls = _config_class(method)
    unbounded = [f.name for f in dataclasses.fields(cls)
                 if _field_type(cls, f.name)[0] in (int, float) and "bounds" not in f.metadata]
    assert unbounded == []


@pytest.mark.parametrize(("method", "key", "value"), [
    ("rotta", "memory_size", "0"), ("cotta", "augmentations", "0"), ("deyo", "patch_len", "0"),
    ("roid", "temperature", "0"), ("lame", "max_steps", "0"), ("rdumb", "reset_every", "-1"),
    ("cotta", "lr", "0"), ("rotta", "momentum", "1"), ("sar", "reset_threshold", "-1"),
])
def test_out_of_range_values_are_refused(method: str, key: str, value: str) -> None:
    """Issue #24.12: rotta memory_size=0, cotta augmentations=0, deyo patch_len=0 divided by zero."""
    with pytest.raises(TTAError, match=f"invalid value '{value}' for {key}"):
        parse_overrides(_config_class(method), method, {key: value})


def test_the_command_line_says_so_in_one_line(tiny_model_dir: Path, image_folder: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from tta_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["tta", "adapt", str(image_folder), "-m", f"local-dir:{tiny_model_dir}",
                                      "--method", "rotta", "--set", "memory_size=0", "-o", str(tmp_path / "o"), "-q"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and "memory_size" in err
    assert not (tmp_path / "o").exists()
