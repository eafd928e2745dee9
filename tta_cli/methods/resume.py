"""A method's run state for ``--resume`` (``TTAMethod.state_for_resume``): what it holds and how
it is written as plain data.

Everything the next batch depends on: the modules' tensors (model, and a teacher method's student or
anchor), the optimiser and loss scaler, the method's generator, the batch count, the reset and
non-finite logs, the tracked BatchNorm stream statistics and the method's declared
``resume_attributes``. ``tta_cli.checkpoint`` writes it with ``torch.save`` and reads it with
``torch.load(weights_only=True)``, so every value is a tensor, number, string, list or dict.

Of the modules' tensors a checkpoint keeps only those that may differ from a freshly built method's
(``changed_tensors``): every buffer (BatchNorm's running statistics change inside its kernel, where
torch's version counter does not see it) and the parameters written in place since
``mark_initial_tensors`` (an optimiser step, an EMA, a reset: each bumps the version counter), or
replaced. Frozen weights, source copies and anchors are left out, so a checkpoint of a model that
adapts its normalisation layers costs kilobytes instead of the model's size (docs/PERFORMANCE.md);
a resumed run rebuilds them from the model, whose weights it checks against the checkpoint's
(``tta_cli.run``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tta_cli.errors import TTAError

if TYPE_CHECKING:
    from tta_cli.methods.base import TTAMethod


TensorMark = tuple[torch.UntypedStorage, int, int]
"""A parameter's storage (held, so that its address cannot be reused), offset and version."""


def mark_initial_tensors(method: TTAMethod) -> dict[str, TensorMark]:
    """Where each parameter of ``method`` stands now (``changed_tensors`` keeps what moved since)."""
    return {name: (p.untyped_storage(), p.storage_offset(), p._version)
            for name, p in method.named_parameters(remove_duplicate=False)}


def changed_tensors(method: TTAMethod) -> tuple[dict[str, torch.Tensor], bool]:
    """(the tensors of ``method.state_dict()`` that may differ from a fresh build's, whether that is
    all of them): everything where nothing was marked."""
    marks: dict[str, TensorMark] | None = method._initial_tensors
    kept = {name: tensor.detach().clone() for name, tensor in method.state_dict().items()
            if marks is None or name not in marks or _moved(tensor, marks[name])}
    return kept, marks is None


def _moved(tensor: torch.Tensor, mark: TensorMark) -> bool:
    storage, offset, version = mark
    return (tensor.untyped_storage().data_ptr() != storage.data_ptr() or tensor.storage_offset() != offset
            or tensor._version != version)


def method_state(method: TTAMethod) -> dict[str, Any]:
    """The state of ``method`` (settled: no value left on the device unread)."""
    hooks = method._bn_hooks
    # a fixed model is rebuilt from its source on resume: copying it would cost a model's size per save
    modules, complete = (None, True) if method.model_is_fixed else changed_tensors(method)
    return {
        "modules": modules,
        "modules_complete": complete,
        "optimizer": method.optimizer.state_dict() if method.optimizer is not None else None,
        "scaler": method.scaler.state_dict() if method.scaler is not None else None,
        "generator": method.generator.get_state(),
        "batches_seen": method.batches_seen,
        "resets": [[k, bool(v)] for k, v in method._reset_flags.entries()],
        "non_finite": [[k, bool(v)] for k, v in method._non_finite.entries()],
        "attributes": {name: _plain(getattr(method, name)) for name in method.resume_attributes},
        "bn_stream": hooks.stream_state() if hooks is not None else {},
    }


@torch.no_grad()
def load_method_state(method: TTAMethod, state: dict[str, Any]) -> None:
    """The inverse of ``method_state``, on a freshly built method of the same run."""
    if state["modules"] is not None:
        current = method.state_dict()
        missing = set(current) - set(state["modules"]) if state.get("modules_complete", True) else set()
        unknown = set(state["modules"]) - set(current)
        if missing or unknown:
            names = ", ".join(sorted(missing | unknown)[:3])
            raise TTAError(f"the checkpoint's tensors do not match the method's ({names})",
                           "resume with the method and model the run started with, or run it again with --overwrite")
        for name, tensor in state["modules"].items():
            current[name].copy_(tensor)
    if method.optimizer is not None and state["optimizer"] is not None:
        method.optimizer.load_state_dict(state["optimizer"])
    if method.scaler is not None and state["scaler"] is not None:
        method.scaler.load_state_dict(state["scaler"])
    method.generator.set_state(state["generator"])
    method.batches_seen = int(state["batches_seen"])
    for key, hit in state["resets"]:
        method._reset_flags.add(int(key), bool(hit))
    for key, hit in state["non_finite"]:
        method._non_finite.add(int(key), bool(hit))
    for name, value in state["attributes"].items():
        setattr(method, name, _restored(getattr(method, name, None), value, method.device))
    if method._bn_hooks is not None:
        method._bn_hooks.load_stream_state(state.get("bn_stream", {}), method.device)


def _plain(value: Any) -> Any:
    """``value`` as tensors, numbers, strings, lists and dicts (what ``torch.load(weights_only=True)``
    reads back); a dataclass or plain object becomes the dict of its attributes."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "__dict__"):
        kind = f"{type(value).__module__}:{type(value).__qualname__}"
        return {"__object__": kind, **{k: _plain(v) for k, v in vars(value).items()}}
    raise TypeError(f"cannot save {type(value).__name__} for --resume")


def _restored(current: Any, value: Any, device: torch.device) -> Any:
    """A saved ``_plain`` value back on ``device``, into ``current``'s object where it was one."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) and "__object__" in value:
        if current is None or not hasattr(current, "__dict__"):
            current = _new_object(value["__object__"])
        for key, item in value.items():
            if key != "__object__":
                setattr(current, key, _restored(getattr(current, key, None), item, device))
        return current
    if isinstance(value, dict):
        return {k: _restored(None, v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_restored(None, v, device) for v in value]
    return value


def _new_object(kind: str) -> Any:
    """An empty instance of a method's own class (e.g. a memory bank), to be filled by ``_restored``;
    only classes of ``tta_cli.methods`` are made, never any other (a checkpoint is data, not code)."""
    import importlib

    module, _, qualname = kind.partition(":")
    if not module.startswith("tta_cli.methods."):
        raise TypeError(f"cannot restore a {kind} for --resume")
    cls = getattr(importlib.import_module(module), qualname)
    return object.__new__(cls)
