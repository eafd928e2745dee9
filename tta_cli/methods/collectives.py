"""Sums over the processes of a data-parallel run: the one door through which methods see them.

A method's means, counts and BatchNorm statistics are over the batch. Under ``torchrun`` each
process holds some rows of the global batch, and those quantities must be the global batch's
(docs/DISTRIBUTED.md). The methods ask ``world()`` for them; in one process it is ``OneProcess``,
where every sum is the local value itself (the arithmetic is the single-process one, bit for bit).
The run's set-up layer installs the process group's implementation (``tta_cli.distributed``) with
``use`` when it joins one, so the methods never depend on how the processes talk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RowSpan = tuple[int, int]
"""(first, total): a process's rows of a batch start at row ``first`` of the ``total`` rows that
all processes hold together (``OneProcess.row_span``)."""


class OneProcess:
    """The collectives of a single process: identities."""

    active = False
    """More than one process holds rows of each batch."""

    def is_main(self) -> bool:
        """This process writes what is written once (rank 0)."""
        return True

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the processes, without gradient (here ``tensor`` itself)."""
        return tensor

    def sum_int(self, value: int) -> int:
        return value

    def sum_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the processes, whose gradient is summed over them too."""
        return tensor

    def sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes, in place (here nothing to do)."""

    def channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel mean and biased variance of the batch, and the values per channel."""
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var, x.numel() // x.shape[1]

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``tensor``, concatenated in process order (the global batch, in
        stream order), on every process, without gradient (here ``tensor`` itself)."""
        return tensor

    def row_span(self, rows: int) -> RowSpan:
        """(first, total): where this process's ``rows`` rows start among every process's rows, in
        process order, and how many there are in all (here ``(0, rows)``)."""
        return 0, rows

    def part(self, total: int) -> tuple[int, int]:
        """(start, stop) of this process's share of ``total`` rows that every process holds alike
        (``torch.tensor_split``'s parts, in process order; here all of them)."""
        return 0, total


_installed: list[OneProcess] = [OneProcess()]


def world() -> OneProcess:
    """The collectives of this process's run."""
    return _installed[0]


def use(collectives: OneProcess | None) -> None:
    """Install ``collectives`` for every method of this process (None: one process again)."""
    _installed[0] = collectives if collectives is not None else OneProcess()


__all__ = ["OneProcess", "RowSpan", "use", "world"]
