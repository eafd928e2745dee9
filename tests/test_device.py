"""Device policy: explicit devices must exist, channels-last for conv nets on CUDA, backends."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import tiny_timm
from tta_cli.device import configure_backends, resolve_channels_last, resolve_device
from tta_cli.errors import TTAError

CPU = torch.device("cpu")


def test_auto_and_explicit_devices() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu") == CPU
    with pytest.raises(TTAError, match="invalid device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TTAError, match="CUDA is not available"):
            resolve_device("cuda")


def test_channels_last_auto_means_conv_nets_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert resolve_channels_last("auto", tiny_timm("test_resnet"), cuda) is True
    assert resolve_channels_last("auto", tiny_timm("test_vit"), cuda) is False
    assert resolve_channels_last("auto", tiny_timm("test_resnet"), CPU) is False
    assert resolve_channels_last("on", tiny_timm("test_vit"), CPU) is True
    assert resolve_channels_last("off", tiny_timm("test_resnet"), cuda) is False
    with pytest.raises(TTAError):
        resolve_channels_last("yes", tiny_timm("test_resnet"), CPU)


def test_configure_backends_leaves_the_cpu_alone() -> None:
    before = torch.backends.cudnn.benchmark
    configure_backends(CPU)
    assert torch.backends.cudnn.benchmark == before
