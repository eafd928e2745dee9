"""Norm-layer discovery, parameter selection and BatchNorm statistics: shared by every method.

Entropy methods adapt the affine parameters (weight, bias) of normalisation layers. Which layers
count as norms, which of them a method adapts, and which statistics BatchNorm uses while adapting
are decided here, once, from the layer types and timm's block structure, never from module names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta_cli.errors import TTAError
from tta_cli.methods.collectives import world

BNStats = Literal["batch", "source", "mix", "ema"]
BN_STATS_CHOICES: tuple[str, ...] = ("auto", "batch", "source", "mix", "ema")


def _norm_types() -> tuple[type[nn.Module], ...]:
    types: list[type[nn.Module]] = [nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    try:  # timm's RmsNorm variants do not subclass torch's norms
        from timm.layers import RmsNorm, RmsNorm2d

        types += [RmsNorm, RmsNorm2d]
    except ImportError:  # older timm
        pass
    return tuple(types)


NORM_TYPES = _norm_types()


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm of any dimension, including timm's BatchNormAct2d (a BatchNorm2d subclass)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every normalisation layer that has an affine weight, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None
    ]


def affine_parameters(
    model: nn.Module, module_names: set[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the norm affine weights and biases, optionally of some modules only."""
    selected = []
    for name, module in norm_modules(model):
        if module_names is not None and name not in module_names:
            continue
        for pname in ("weight", "bias"):
            param = getattr(module, pname, None)
            if isinstance(param, nn.Parameter):
                selected.append((f"{name}.{pname}" if name else pname, param))
    return selected


# --- timm block structure -------------------------------------------------------------------------

FINAL_KEY = 99999  # timm's group_matcher suffix for layers after the last block (final norm)


@dataclass(frozen=True)
class BlockLayout:
    """Module names grouped by the model's own structure: stem, ordered blocks, and the rest."""

    stem: tuple[str, ...]
    blocks: tuple[tuple[str, ...], ...]
    final: tuple[str, ...]


def _match_key(name: str, spec: object) -> tuple[float, ...] | None:
    """The ordering key that one timm group_matcher entry gives a module name, or None."""
    rules = [(spec, None)] if isinstance(spec, str) else list(spec)  # type: ignore[arg-type]
    for pattern, suffix in rules:
        match = re.match(pattern, name)
        if match:
            if suffix is not None:
                return tuple(float(s) for s in suffix)
            return tuple(float(g) for g in match.groups() if g is not None)
    return None


def block_layout(model: nn.Module) -> BlockLayout:
    """Group modules into stem / blocks / final using timm's ``group_matcher(coarse=True)``.

    Coarse groups are stages for ConvNets (ResNet ``layer1..4``, ConvNeXt ``stages.0..3``) and
    blocks for ViTs (``blocks.0..11``); modules after the last block (the final norm, the head) are
    "final". Models without a group matcher fall back to their top-level children as blocks.
    """
    names = [name for name, _ in model.named_modules() if name]
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        children = [name for name, _ in model.named_children()]
        blocks = tuple(tuple(n for n in names if n == c or n.startswith(c + ".")) for c in children)
        return BlockLayout(stem=(), blocks=blocks, final=())
    spec = matcher(coarse=True)
    stem_spec = spec.get("stem")
    blocks_spec = spec.get("blocks")
    stem, final = [], []
    grouped: dict[tuple[float, ...], list[str]] = {}
    for name in names:
        if stem_spec is not None and _match_key(name, stem_spec) is not None:
            stem.append(name)
            continue
        key = _match_key(name, blocks_spec) if blocks_spec is not None else None
        if key is None or (key and key[0] >= FINAL_KEY):
            final.append(name)
        else:
            grouped.setdefault(key, []).append(name)
    blocks = tuple(tuple(grouped[k]) for k in sorted(grouped))
    return BlockLayout(stem=tuple(stem), blocks=blocks, final=tuple(final))


def skipped_top_blocks(n_blocks: int) -> int:
    """How many of the last blocks SAR leaves frozen: a quarter, rounded half up, at least one."""
    return max(1, math.floor(n_blocks / 4 + 0.5)) if n_blocks else 0


def sar_norm_modules(model: nn.Module) -> set[str]:
    """Norm layers SAR adapts: all but those in the last quarter of the blocks and the final norm.

    On timm ResNets this is "all but layer4"; on a 12-block ViT "all but blocks 9-11 and norm".
    """
    layout = block_layout(model)
    frozen = set(layout.final)
    for block in layout.blocks[len(layout.blocks) - skipped_top_blocks(len(layout.blocks)) :]:
        frozen.update(block)
    return {name for name, _ in norm_modules(model) if name not in frozen}


# --- BatchNorm statistics while adapting ----------------------------------------------------------


def linear_classifier(model: nn.Module, method: str) -> nn.Linear:
    """timm's classifier (``get_classifier``) where it is one linear layer, for the methods that work
    on its input feature; a user error naming ``method`` otherwise."""
    get = getattr(model, "get_classifier", None)
    classifier = get() if get is not None else None
    if not isinstance(classifier, nn.Linear):
        raise TTAError(f"{method} needs a timm model whose classifier is one linear layer",
                       "choose another method for this model")
    return classifier


def has_batchnorm(model: nn.Module) -> bool:
    return any(is_batchnorm(m) for m in model.modules())


def is_batch_independent(model: nn.Module, bn_mode: str | None) -> bool:
    """No sample's output depends on another's: no BatchNorm normalises with batch statistics
    (``source`` statistics are fixed; ``mix`` and ``ema`` use the batch's)."""
    return not has_batchnorm(model) or bn_mode == "source"


def resolve_bn_stats(requested: str, batch_size: int | None) -> BNStats:
    """``auto`` means the authors' batch statistics, except at batch size 1 where they degenerate
    (instance normalisation, or a crash on 1x1 feature maps): there the source statistics are
    mixed with the sample's (alpha-BN)."""
    if requested == "auto":
        return "mix" if batch_size == 1 else "batch"
    if requested not in BN_STATS_CHOICES:
        raise ValueError(f"bn_stats must be one of {', '.join(BN_STATS_CHOICES)}, got {requested!r}")
    return requested  # type: ignore[return-value]


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorms with running statistics, in the model's order (from the input for the usual
    sequential definitions)."""
    return [m for m in model.modules() if is_batchnorm(m) and m.running_mean is not None]


def _shape(stat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return stat.view(1, -1, *([1] * (x.ndim - 2)))


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batch's per-channel mean and biased variance, and the values per channel; data-parallel,
    the global batch's (``collectives``)."""
    return world().channel_stats(x)


def _renormalised(module: nn.Module, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor]:
    """``x`` rescaled so that the module's own eval-mode normalisation with the source statistics
    yields the normalisation with ``mean`` and ``var`` (gradients flow through them; works for
    every BatchNorm subclass, timm's BatchNormAct2d included)."""
    mean_s, var_s = module.running_mean, module.running_var
    scale = torch.sqrt((var_s + module.eps) / (var + module.eps))
    return ((x - _shape(mean, x)) * _shape(scale, x) + _shape(mean_s, x),)


class BatchNormStats:
    """Makes every BatchNorm of a model normalise with the chosen statistics, via forward hooks.

    The source running statistics stay in the module buffers, untouched outside a forward, so the
    model exports as it loaded (docs/METHODS.md, "Shared behaviour") and ``reset`` never needs them.

    * ``batch``: the current batch's mean and biased variance (the authors' "BN forced to batch
      stats", bit for bit: buffers are None during the forward). A batch with one value per
      channel, where this is undefined, falls back to the source statistics.
    * ``source``: the source running statistics (eval mode).
    * ``mix``: alpha-BN, (1 - a) source + a batch for mean and variance; defined at batch size 1.
    * ``ema``: running statistics updated with momentum ``a`` from each batch, then used.

    ``batch`` hooks the model, not each layer: a batch of two or more samples has more than one
    value per channel in every layer, so one pre-hook removes every layer's buffers for the forward
    and one hook puts them back; a hook on every BatchNorm puts each of its calls on PyTorch's slow
    path (docs/PERFORMANCE.md). Batches of one sample and data-parallel runs, which need a decision
    per layer, get per-layer hooks for that forward.
    """

    def __init__(self, model: nn.Module, mode: BNStats, alpha: float = 0.1,
                 layers: list[nn.Module] | None = None) -> None:
        """``layers``: the BatchNorms to change (default all); the others keep the source statistics."""
        self.mode = mode
        self.alpha = alpha
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._layer_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stash: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._stream: dict[str, list[torch.Tensor | int]] = {}
        self._tracking = False
        self.paused = False
        """While True every BatchNorm normalises with its running (source) statistics and nothing is
        tracked: a forward of the source model without a copy of it."""
        self._layers = layers if layers is not None else batchnorm_layers(model)
        if mode == "source" or not self._layers:
            return
        if mode == "batch":
            self._handles.append(model.register_forward_pre_hook(self._enter_forward))
            self._handles.append(model.register_forward_hook(self._leave_forward, always_call=True))
            return
        self._handles.extend(layer.register_forward_pre_hook(self._pre_hook) for layer in self._layers)

    def remove(self) -> None:
        for handle in self._handles + self._layer_handles:
            handle.remove()
        self._handles.clear()
        self._layer_handles.clear()

    def _enter_forward(self, model: nn.Module, args: tuple[object, ...]) -> None:
        if self.paused:
            return
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.ndim > 1 and x.shape[0] > 1 and not world().active:
            for layer in self._layers:
                # the buffer dict directly: Module.__setattr__ would re-register each buffer
                buffers = layer._buffers
                self._stash[id(layer)] = (buffers["running_mean"], buffers["running_var"])
                buffers["running_mean"] = buffers["running_var"] = None
            return
        for layer in self._layers:
            self._layer_handles.append(layer.register_forward_pre_hook(self._pre_hook))
            self._layer_handles.append(layer.register_forward_hook(self._post_hook))

    def _leave_forward(self, model: nn.Module, args: object, output: object) -> None:
        for layer in self._layers:
            self._post_hook(layer, args, output)
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        if self.paused:
            return None
        x = args[0]
        if self.mode == "batch" and not world().active:
            if x.numel() // x.shape[1] > 1:
                buffers = module._buffers
                self._stash[id(module)] = (buffers["running_mean"], buffers["running_var"])
                buffers["running_mean"] = buffers["running_var"] = None
            return None
        mean_b, var_b, count = _batch_stats(x)
        if self.mode == "batch":  # data-parallel: the global batch's statistics (SyncBatchNorm's)
            return _renormalised(module, x, mean_b, var_b) if count > 1 else None
        if self.mode == "ema":
            with torch.no_grad():
                module.running_mean.lerp_(mean_b.detach().to(module.running_mean), self.alpha)
                module.running_var.lerp_(var_b.detach().to(module.running_var), self.alpha)
            return None
        # mix: rescale the input so the module's own eval-mode normalisation with the source
        # statistics yields the normalisation with the mixed statistics (keeps grads flowing).
        mean_m = (1 - self.alpha) * module.running_mean + self.alpha * mean_b
        var_m = (1 - self.alpha) * module.running_var + self.alpha * var_b
        return _renormalised(module, x, mean_m, var_m)

    def _post_hook(self, module: nn.Module, args: object, output: object) -> None:
        stashed = self._stash.pop(id(module), None)
        if stashed is not None:
            module._buffers["running_mean"], module._buffers["running_var"] = stashed

    # --- the test stream's statistics, for an exported model that normalises as the run did -----

    def track_stream(self, model: nn.Module, momentum: float) -> None:
        """Keep an EMA (``momentum`` per forward; a plain mean while fewer than 1/momentum forwards
        were seen) of the batch statistics each BatchNorm normalised with; read by
        :meth:`stream_running_stats`. Only for the ``batch`` and ``mix`` modes."""
        if self.mode not in ("batch", "mix"):
            return
        self._tracking = True
        self._stream_momentum = momentum
        for name, module in model.named_modules():
            if is_batchnorm(module) and module.running_mean is not None:
                hook = self._stream_hook(name)
                # prepended: mix's own pre-hook replaces the input with a rescaled one
                self._handles.append(module.register_forward_pre_hook(hook, prepend=True))

    def _stream_hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self.paused:
                return
            with torch.no_grad():
                # data-parallel: the global batch's, as the run normalised with (a collective, so
                # every rank tracks)
                mean_b, var_b, values = _batch_stats(args[0].detach().float())
                if self.mode == "batch" and values <= 1:
                    return  # this forward fell back to the source statistics
                entry = self._stream.get(name)
                if entry is None:
                    self._stream[name] = [mean_b, var_b, 1]
                    return
                entry[2] = int(entry[2]) + 1
                weight = max(self._stream_momentum, 1.0 / int(entry[2]))
                entry[0] = torch.lerp(entry[0], mean_b, weight)  # type: ignore[arg-type]
                entry[1] = torch.lerp(entry[1], var_b, weight)  # type: ignore[arg-type]
        return hook

    def stream_state(self) -> dict[str, list[torch.Tensor | int]]:
        """The tracked stream statistics (run state, kept for ``--resume``)."""
        return {name: [entry[0].clone(), entry[1].clone(), int(entry[2])]  # type: ignore[union-attr]
                for name, entry in self._stream.items()}

    def load_stream_state(self, state: dict[str, list[torch.Tensor | int]], device: torch.device) -> None:
        if not self._tracking:
            return  # not tracking in this run (``--export-bn source``)
        self._stream = {name: [entry[0].to(device), entry[1].to(device), int(entry[2])]  # type: ignore[union-attr]
                        for name, entry in state.items()}

    def stream_running_stats(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """State-dict entries (``<bn>.running_mean``/``running_var``) that make the model, in eval
        mode, normalise with the tracked stream statistics: the EMA itself for ``batch``, mixed
        with the source statistics as the run mixed them for ``mix``. Empty when nothing was tracked."""
        stream = self._stream
        state: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name not in stream:
                continue
            mean, var = stream[name][0], stream[name][1]
            if self.mode == "mix":
                mean = (1 - self.alpha) * module.running_mean.float() + self.alpha * mean  # type: ignore[operator]
                var = (1 - self.alpha) * module.running_var.float() + self.alpha * var  # type: ignore[operator]
            prefix = f"{name}." if name else ""
            state[prefix + "running_mean"] = mean.to(module.running_mean)  # type: ignore[union-attr]
            state[prefix + "running_var"] = var.to(module.running_var)  # type: ignore[union-attr]
        return state


# --- the SAR/DeYO authors' name rule --------------------------------------------------------------

AUTHORS_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
AUTHORS_SKIPPED_NAME_PARTS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def authors_name_rule_modules(model: nn.Module) -> set[str]:
    """Norm layers the SAR/DeYO code adapts, chosen by module name as it does.

    Skips modules whose name contains ``layer4``, ``blocks.9``-``blocks.11`` or ``norm.``, or is
    ``norm``; only BatchNorm2d, LayerNorm and GroupNorm (timm subclasses included) count. The names
    fit ResNet-50 and ViT-B only: on timm ResNets this is ``sar_norm_modules``, on ConvNeXt (and
    anything else) it skips nothing, the final ``head.norm`` included. Kept for fidelity to the
    authors' results; the structural rule above is the general one.
    """
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, AUTHORS_NORM_TYPES)
        and name != "norm"
        and not any(part in name for part in AUTHORS_SKIPPED_NAME_PARTS)
    }
def weight_bias_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every module's own ``weight`` and ``bias``, in module order (convolutions, linear layers and
    norms alike): what CoTTA adapts and restores in the authors' code (other parameters, such as a
    ViT's class token or position embedding, stay frozen)."""
    selected = []
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname in ("weight", "bias"):
                selected.append((f"{name}.{pname}" if name else pname, param))
    return selected


def norm_family(model: nn.Module) -> str:
    """``bn`` if the model has BatchNorm, else ``gn`` or ``ln`` by its GroupNorm/LayerNorm layers,
    ``none`` without norm layers: the key of per-family choices such as bf16 fallbacks."""
    if has_batchnorm(model):
        return "bn"
    kinds = {type(m) for _, m in norm_modules(model)}
    if any(issubclass(k, nn.GroupNorm) for k in kinds):
        return "gn"
    return "ln" if kinds else "none"
