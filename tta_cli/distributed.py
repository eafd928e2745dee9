"""Data-parallel adaptation on PyTorch's own distributed engine (``torch.distributed``, ``torchrun``).

``torchrun --nproc-per-node N --no-python tta adapt ... --batch-size B`` runs N processes (ranks);
``B`` stays the global batch. Each rank decodes and adapts on its rows of every global batch
(``torch.tensor_split`` of the B rows into N parts, in stream order), and every quantity that
depends on the whole batch is summed over the ranks, so the result is one process's at batch B
(docs/DISTRIBUTED.md):

* losses that are means over (selected) samples are local sums over the global count, and the
  gradients are summed over the ranks after each backward (``all_reduce_grads``);
* BatchNorm on batch statistics uses the global batch's mean and variance (``channel_stats``);
* filters' counts, EMAs and reset decisions are taken on global values (``all_sum``), so every
  rank takes the same decisions and the parameters stay identical;
* rank 0 gathers every batch's per-sample outputs (``GatherToMain``) and alone writes the outputs.

In one process (no ``torchrun``) every helper here is the identity: the single-process arithmetic
is unchanged, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tta_cli.errors import TTAError
from tta_cli.methods import collectives, get_method_class, list_methods
from tta_cli.outputs import BatchOutputs, Sink, Totals
from tta_cli.sources.items import Batch, StreamItem
from tta_cli.sources.loader import MAX_IMAGE_PIXELS, Transform, decoded_stream
from tta_cli.sources.stream import ImagePart, Stream

TIMEOUT_ENV = "TTA_DIST_TIMEOUT"
"""Seconds a collective waits for the other ranks before the run stops (default 300)."""
FAULT_ENV = "TTA_FAULT_EXIT_AFTER"
"""Testing hook, ``RANK:K``: that rank exits abruptly after K batches (a crashed process)."""
DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class World:
    """Where this process stands in the run, from torchrun's environment variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """This process's place from ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (one process without)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise TTAError(f"bad torchrun environment: {err}", "RANK, WORLD_SIZE and LOCAL_RANK must be integers") \
            from err


_state: dict[str, Any] = {"device": torch.device("cpu")}


def active() -> bool:
    """A process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def rank_device(requested: str, world: World) -> str:
    """The device of this rank: the GPU of its local rank when the run uses CUDA."""
    wants_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if world.world_size > 1 and wants_cuda:
        return f"cuda:{world.local_rank}"
    return requested


def start(requested_device: str, world: World | None = None) -> str:
    """Join the process group (nccl on CUDA, gloo on the CPU) when launched with more than one rank;
    return the device this rank runs on. In one process nothing happens."""
    world = world or launched()
    device = rank_device(requested_device, world)
    if active():
        collectives.use(ProcessGroup())
    if world.world_size <= 1 or active():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    _state["owned"] = True
    _state["device"] = torch.device(device) if cuda else torch.device("cpu")
    collectives.use(ProcessGroup())
    return device


def stop() -> None:
    """Leave the process group this module started (one a library user started is theirs)."""
    collectives.use(None)
    if _state.pop("owned", False) and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


# --- collectives: identities in one process ------------------------------------------------------


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks (a new tensor, no gradient); ``tensor`` itself in one process."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def all_sum_int(value: int) -> int:
    if not active():
        return value
    return int(all_sum(torch.tensor(value, dtype=torch.long, device=_state["device"])))


class _SumOverRanks(torch.autograd.Function):
    """Sum over the ranks with autograd: the gradient of a global sum is summed over the ranks too
    (each rank's loss depends on every rank's contribution)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def all_sum_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _SumOverRanks.apply(tensor) if active() else tensor


def global_count(local: int) -> int:
    return all_sum_int(local)


@torch.no_grad()
def all_reduce_grads(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients over the ranks (one flat collective); a missing gradient counts as zero,
    so every rank sends the same tensors."""
    if not active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        n = grad.numel()
        param.grad = flat[offset:offset + n].view_as(grad).clone()
        offset += n


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and biased variance over the global batch (SyncBatchNorm's statistics, two
    passes: the mean first, then the squared deviations from it), and the global count per channel.
    Differentiable: gradients flow through the statistics to every rank's rows."""
    dims = [d for d in range(x.ndim) if d != 1]
    local_n = x.numel() // x.shape[1] if x.shape[1] else 0
    sums = all_sum_with_grad(torch.cat([x.sum(dims), x.new_tensor([float(local_n)])]))
    count = int(sums[-1].detach())
    mean = sums[:-1] / max(count, 1)
    centred = x - mean.view(1, -1, *([1] * (x.ndim - 2)))
    var = all_sum_with_grad((centred * centred).sum(dims)) / max(count, 1)
    return mean, var, count


def _row_counts(rows: int, device: torch.device) -> list[int]:
    """Every rank's number of rows, in rank order."""
    mine = torch.tensor([rows], dtype=torch.long, device=device)
    counts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, on every rank (``tensor`` itself in one
    process). Ranks may hold different numbers of rows (padded for the collective, then cut)."""
    if not active():
        return tensor
    counts = _row_counts(tensor.shape[0], tensor.device)
    wire = tensor.detach().to(torch.uint8) if tensor.dtype == torch.bool else tensor.detach()
    padded = wire.new_zeros((max(counts), *wire.shape[1:]))
    padded[:wire.shape[0]] = wire
    parts = [torch.empty_like(padded) for _ in counts]
    if padded.numel():
        dist.all_gather(parts, padded)
    gathered = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
    return gathered.to(tensor.dtype)


def row_span(rows: int) -> collectives.RowSpan:
    """(first, total) of this rank's ``rows`` among every rank's, in rank order."""
    if not active():
        return 0, rows
    counts = _row_counts(rows, _state["device"])
    return sum(counts[:rank()]), sum(counts)


class ProcessGroup(collectives.OneProcess):
    """The methods' collectives (``tta_cli.methods.collectives``) over this process group."""

    @property  # type: ignore[override]
    def active(self) -> bool:
        return active()

    def is_main(self) -> bool:
        return is_main()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_sum(tensor)

    def sum_int(self, value: int) -> int:
        return all_sum_int(value)

    def sum_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_sum_with_grad(tensor)

    def sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        all_reduce_grads(params)

    def channel_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return channel_stats(x) if active() else super().channel_stats(x)

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather_rows(tensor)

    def row_span(self, rows: int) -> collectives.RowSpan:
        return row_span(rows)

    def part(self, total: int) -> tuple[int, int]:
        return rank_rows(total, world_size(), rank())


# --- the stream: each rank's rows -----------------------------------------------------------------


def check_world(batch_size: int, method: str, has_video: bool) -> None:
    """What data-parallel adaptation cannot do, refused before any work (docs/DISTRIBUTED.md)."""
    n = world_size()
    if n <= 1:
        return
    if batch_size < n:
        raise TTAError(f"--batch-size {batch_size} is below the world size {n}",
                       "each rank takes at least one row of every batch: use --batch-size >= the number of ranks")
    method_class = get_method_class(method)
    if not method_class.data_parallel:
        why = method_class.not_data_parallel or "it was not made data-parallel"
        raise TTAError(f"{method} cannot run data-parallel (world size {n}): {why}",
                       "run it in one process, or use --per-input; data-parallel: "
                       f"{', '.join(data_parallel_methods())}")
    if has_video:
        raise TTAError("videos cannot be split over ranks (their frames are known only once decoded)",
                       "use --per-input to give each rank whole videos, or run in one process")


def data_parallel_methods() -> list[str]:
    """The methods whose every whole-batch quantity is global (``TTAMethod.data_parallel``)."""
    return [name for name in list_methods() if get_method_class(name).data_parallel]


def rank_rows(n_rows: int, ranks: int, this_rank: int) -> tuple[int, int]:
    """(start, stop) of this rank's rows of a batch: ``torch.tensor_split``'s parts, in order."""
    base, extra = divmod(n_rows, ranks)
    start = this_rank * base + min(this_rank, extra)
    return start, start + base + (1 if this_rank < extra else 0)


def rank_items(items: Sequence[Any], batch_size: int, ranks: int, this_rank: int) -> list[list[Any]]:
    """This rank's items of every global batch of ``batch_size`` stream items."""
    batches = []
    for first in range(0, len(items), batch_size):
        batch = items[first:first + batch_size]
        start, stop = rank_rows(len(batch), ranks, this_rank)
        batches.append(list(batch[start:stop]))
    return batches


def rank_batches(stream: Stream, transform: Transform, batch_size: int, image_shape: Sequence[int],
                 workers: int = 0, pin_memory: bool = False,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Iterator[Batch]:
    """This rank's rows of every global batch of ``batch_size`` stream items, decoded by this rank
    alone (no rank decodes another's rows). Every rank yields one batch per global batch, in order,
    so they stay in step; a part with no rows (a short last batch, or only unreadable files) is an
    empty tensor of ``image_shape`` rows, which still takes part in the collectives.

    Batches are cut by stream items, before decoding: an unreadable file makes its batch one row
    shorter instead of pulling in the next file (one process refills the batch), so results equal
    one process's where every input can be read."""
    items: list[StreamItem] = [item for part in stream.parts if isinstance(part, ImagePart) for item in part.items]
    mine = rank_items(items, batch_size, world_size(), rank())
    flat = [item for batch in mine for item in batch]
    decoded = decoded_stream(Stream([ImagePart(flat)], stream.cache), transform, workers, min(batch_size, 32),
                             max_pixels)
    shape = tuple(image_shape)
    for number, batch_items in enumerate(mine):
        kept: list[StreamItem] = []
        images: list[torch.Tensor] = []
        skipped: list[tuple[StreamItem, str]] = []
        for _ in batch_items:
            item, image, error = next(decoded)
            if image is None:
                skipped.append((item, error or "unreadable"))
                continue
            kept.append(item)
            images.append(image)
            shape = tuple(image.shape)
        tensor = torch.stack(images) if images else torch.empty((0, *shape))
        # the global batch's first stream index, alike on every rank: the source reference's choice
        # of batches (``tta_cli.reference``) is then the global batch's, as in one process
        yield Batch(kept, tensor.pin_memory() if pin_memory else tensor, number * batch_size, skipped)


# --- outputs: gathered to rank 0 ------------------------------------------------------------------


class GatherToMain:
    """A sink that gathers every rank's outputs of a batch to rank 0, in rank order (= stream order),
    and hands rank 0 one batch's outputs to its sinks; other ranks hand nothing on."""

    def __init__(self, sinks: Sequence[Sink], totals: Totals | None = None) -> None:
        """``totals``: the run's counts, which take the global outputs (rank 0)."""
        self.sinks = list(sinks) if is_main() else []
        self.totals = totals if totals is not None else Totals()
        """The global totals (rank 0)."""
        self.batches = 0
        self._decoded = 0
        self._fault = _fault_after()

    def on_batch(self, outputs: BatchOutputs) -> None:
        self.batches += 1
        if self._fault is not None and self.batches > self._fault:
            os._exit(17)  # a crashed rank: no cleanup, no goodbye to the others
        payload = _payload(outputs)
        parts: list[Any] = [None] * world_size() if is_main() else []
        dist.gather_object(payload, parts if is_main() else None, dst=0)
        if not is_main():
            return
        merged = _merge(parts, outputs, self._decoded)
        self._decoded += len(merged.batch.items)
        self.totals.add(merged)
        for sink in self.sinks:
            sink.on_batch(merged)


def _fault_after() -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    target, _, after = spec.partition(":")
    if not spec or int(target) != rank():
        return None
    return int(after)


def _payload(out: BatchOutputs) -> dict[str, Any]:
    return {"items": out.batch.items, "skipped": out.batch.skipped, "pred": out.pred, "confidence": out.confidence,
            "entropy": out.entropy, "top5": out.top5, "used": out.used, "filtered": out.filtered,
            "reset": out.reset, "seconds": out.seconds, "source_rows": out.source_rows,
            "source_logits": out.source_logits, "reference_seconds": out.reference_seconds}


def _merge(parts: list[dict[str, Any]], own: BatchOutputs, first_index: int) -> BatchOutputs:
    """One batch's outputs from every rank's part: rows concatenated in rank order, filter counts
    summed (each rank counted its own rows), the reset decision (the same on every rank) as is."""
    with_rows = [p for p in parts if p["items"]] or parts[:1]
    items = [item for p in parts for item in p["items"]]
    batch = replace(own.batch, items=items, first_index=first_index,
                    skipped=[s for p in parts for s in p["skipped"]],
                    images=torch.empty(0))
    widths = [len(p["filtered"]) for p in parts]
    filtered = tuple(sum(p["filtered"][i] for p in parts) for i in range(max(widths)))

    def cat(key: str) -> torch.Tensor:
        return torch.cat([p[key] for p in with_rows])

    source_rows, source_logits = _merged_reference(parts)
    return BatchOutputs(batch, cat("pred"), cat("confidence"), cat("entropy"), cat("top5"), cat("used"),
                        filtered, bool(parts[0]["reset"]), max(p["seconds"] for p in parts),
                        source_rows, source_logits, max(p["reference_seconds"] for p in parts))


def _merged_reference(parts: list[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The source reference's rows of the global batch (each rank's, shifted by the rows of the
    ranks before it) and their logits; None without a reference."""
    if all(part["source_rows"] is None for part in parts):
        return None, None
    rows, logits, offset = [], [], 0
    for part in parts:  # a rank with no row of the batch made no reference pass (None)
        if part["source_rows"] is not None and len(part["source_rows"]):
            rows.append(part["source_rows"].cpu() + offset)
            logits.append(part["source_logits"].cpu())
        offset += len(part["pred"])
    if not rows:
        return torch.empty(0, dtype=torch.long), torch.empty((0, 0))
    return torch.cat(rows), torch.cat(logits)


@contextlib.contextmanager
def peer_failures() -> Iterator[None]:
    """A collective that fails because another rank stopped (crashed, killed, timed out) becomes one
    clear error instead of a traceback; nothing this rank wrote is marked complete."""
    if not active():
        yield
        return
    try:
        yield
    except (RuntimeError, dist.DistError) as err:
        if isinstance(err, TTAError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TTAError(f"rank {rank()} of {world_size()}: the distributed run stopped, another rank failed or "
                       f"timed out ({first[:200]})",
                       "see the other ranks' messages; the outputs of this run are incomplete", exit_code=3) \
            from err
