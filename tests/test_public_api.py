"""The public names of ``tta_cli``: each one resolves, and importing the package stays free of torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import tta_cli


@pytest.mark.parametrize("name", tta_cli.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(tta_cli, name) is not None


def test_public_names_are_the_library_objects() -> None:
    from tta_cli.engine import run_stream
    from tta_cli.methods import TTAMethod, create_method
    from tta_cli.run import adapt, predict

    assert tta_cli.create_method is create_method and tta_cli.TTAMethod is TTAMethod
    assert tta_cli.adapt is adapt and tta_cli.run_stream is run_stream and tta_cli.predict is predict
    with pytest.raises(AttributeError, match="no attribute"):
        tta_cli.no_such_name  # noqa: B018


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, tta_cli; print('torch' in sys.modules, tta_cli.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"
