"""A method that decides around another one: the small protocol between such a policy and the
method it runs.

``WrappingMethod`` holds an ``inner`` ``TTAMethod`` and answers the run's calls by forwarding them to
it (reset, resume state, export, speed options, records), except ``step`` and the records, which
the wrapper defines. It never pretends to be a ``TTAMethod`` itself: what it has of one is listed
here, each member saying where it comes from.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
from torch import nn

from tta_cli.methods.base import MethodConfig, StepResult, TTAMethod
from tta_cli.methods.precision import Performance


class WrappingMethod(nn.Module):
    """Base of the methods that run another; subclasses set ``name`` and ``config_class`` and
    define ``step``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    predicts_first_forward: ClassVar[bool] = False
    changes_predictions: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = False
    not_data_parallel: ClassVar[str] = (
        "its choices around the method it runs would be taken on each process's rows of a batch, not "
        "on the global batch; name one of the data-parallel methods instead")
    clean_data: ClassVar[str] = ""
    without_clean_data: ClassVar[str] = ""

    def __init__(self, inner: TTAMethod, config: MethodConfig, batch_size: int) -> None:
        super().__init__()
        self.inner = inner
        self.config = config
        self.batch_size = batch_size
        self.batches_seen = 0

    def step(self, x: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x).logits

    # --- the inner method's, as they are ---------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.inner.model

    @property
    def updates_parameters(self) -> bool:
        return self.inner.updates_parameters

    @property
    def bn_mode(self) -> str | None:
        return self.inner.bn_mode

    @property
    def params(self) -> list[torch.Tensor]:
        return self.inner.params

    @property
    def param_names(self) -> list[str]:
        return self.inner.param_names

    @property
    def performance(self) -> Performance:
        return self.inner.performance

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def resets(self) -> list[int]:
        return self.inner.resets

    @property
    def non_finite_updates(self) -> int:
        return self.inner.non_finite_updates

    def configure_performance(self, precision: str = "fp32", channels_last: bool = False,
                              compile: bool | str = False) -> None:
        self.inner.configure_performance(precision, channels_last, compile)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return self.inner.autocast()

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.prepare_input(x)

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)

    def reset(self) -> None:
        self.inner.reset()

    def settle(self) -> None:
        self.inner.settle()

    def state_for_resume(self) -> dict[str, Any]:
        """The inner method's state only: the wrapper's own windows start afresh on a resume, so a
        resumed run can differ from an uninterrupted one after the resume point."""
        return self.inner.state_for_resume()

    def load_resume_state(self, state: dict[str, Any]) -> None:
        self.inner.load_resume_state(state)

    def mark_initial_tensors(self) -> None:
        self.inner.mark_initial_tensors()

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.adapted_state_dict()

    def track_stream_bn_statistics(self, momentum: float) -> bool:
        """A policy exports the statistics it chose (``stream_bn_statistics``), not an EMA of the inner's."""
        return False

    def stream_bn_statistics(self) -> dict[str, torch.Tensor]:
        return self.inner.stream_bn_statistics()

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.inner.extra_exports()

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict[str, Any]:
        return {"inner": self.inner.stats()}

    def describe(self) -> dict[str, Any]:
        """The inner method's description under the wrapper's name, the inner's kept as ``inner``."""
        info = self.inner.describe()
        info["inner"] = info["method"]
        info["inner_config"] = info["config"]
        info.update(method=self.name, config=dict(vars(self.config)))
        return info


__all__ = ["WrappingMethod"]
