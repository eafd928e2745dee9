"""auto's reset of the inner method where the input's domain changes (``auto.domain_change``)."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tests.helpers import tiny_timm
from tta_cli.methods import create_method
from tta_cli.methods.auto.domain_change import DomainChange, first_norm_statistics


def _batches(count: int, batch_size: int = 16, shift: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """Noise images; ``shift`` scales their contrast and moves their brightness (a new domain)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, 32, 32, generator=g) * (1 + shift) + shift for _ in range(count)]


def _changes(reference: nn.Module, batches: list[torch.Tensor]) -> list[int]:
    detector = DomainChange(reference)
    for index, x in enumerate(batches):
        with torch.no_grad():
            pred = reference(x).argmax(1)
        detector.add(pred, 10, index)
    detector.remove()
    return detector.changes


@pytest.mark.parametrize("arch", ["test_efficientnet_gn", "test_vit"])
def test_a_change_of_domain_is_found_where_it_happens_and_nowhere_else(arch: str) -> None:
    reference = tiny_timm(arch).eval()
    assert _changes(reference, _batches(20)) == []
    changes = _changes(reference, _batches(10) + _batches(10, shift=2.0, seed=1))
    assert changes and changes[0] == 10


def test_small_batches_are_tested_together() -> None:
    reference = tiny_timm("test_efficientnet_gn").eval()
    assert _changes(reference, _batches(40, batch_size=4)) == []
    changes = _changes(reference, _batches(40, batch_size=4) + _batches(20, batch_size=4, shift=2.0, seed=1))
    assert changes and 40 <= changes[0] <= 43


def test_statistics_take_the_channels_where_the_layer_has_them() -> None:
    assert first_norm_statistics(nn.GroupNorm(2, 4), torch.randn(3, 4, 5, 5)).shape == (3, 8)
    tokens = torch.randn(3, 7, 6)  # (batch, tokens, channels): a transformer's LayerNorm
    statistics = first_norm_statistics(nn.LayerNorm(6), tokens)
    assert statistics.shape == (3, 12)
    assert torch.allclose(statistics[:, :6], tokens.mean(1))
    features = torch.randn(3, 6)  # (batch, features): a norm layer after a flatten
    assert torch.equal(first_norm_statistics(nn.LayerNorm(6), features)[:, :6], features)


def test_the_guard_resets_the_inner_method_at_a_change_and_records_it() -> None:
    model = tiny_timm("test_efficientnet_gn")
    auto = create_method("auto", model, batch_size=16, inner="tent", domain_change=True, harm_points=0.0)
    resets = []
    auto.inner.reset = lambda: resets.append(auto.batches_seen)  # type: ignore[method-assign]
    for x in _batches(8) + _batches(6, shift=2.0, seed=1):
        auto.step(x)
    assert auto.stats()["domain_changes"] == [8] and resets == [8]
    auto.close()


def test_on_by_default_and_said_in_the_choice() -> None:
    auto = create_method("auto", tiny_timm("test_efficientnet_gn"), batch_size=16)
    assert auto.guard is not None and auto.guard.domain is not None
    assert "restarts from the source model where the input's domain changes" in auto.describe()["choice"]["why"]
    off = create_method("auto", tiny_timm("test_efficientnet_gn"), batch_size=16, domain_change=False)
    assert off.guard is not None and off.guard.domain is None and off.stats()["domain_changes"] == []
    assert "domain changes" not in off.describe()["choice"]["why"]


def test_a_resumed_detector_decides_as_the_uninterrupted_one() -> None:
    reference = tiny_timm("test_efficientnet_gn").eval()
    stream = _batches(10) + _batches(10, shift=2.0, seed=1)
    first, resumed = DomainChange(reference), DomainChange(reference)
    for index, x in enumerate(stream[:7]):
        with torch.no_grad():
            first.add(reference(x).argmax(1), 10, index)
    buffer = io.BytesIO()
    torch.save(first.state(), buffer)
    resumed.load_state(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for index, x in enumerate(stream[7:], start=7):
        with torch.no_grad():
            pred = reference(x).argmax(1)
        assert first.add(pred, 10, index) == resumed.add(pred, 10, index)
    assert first.changes == resumed.changes and first.changes
