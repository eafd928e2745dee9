"""Loading models: timm registry names, aliases, ``hf-hub:``, ``local-dir:`` and checkpoint files.

Everything a run needs to know about its model comes back in one :class:`LoadedModel`: the module,
its class names, the preprocessing from its ``pretrained_cfg`` (never guessed, trap 1 of the spec),
the exact weight tag and a hash of the weights (trap 2).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta_cli.classes import ClassNames, class_ids_of
from tta_cli.errors import TTAError
from tta_cli.model_hub import check_weights_available, offline_hint

# The SAR paper's models, pinned to the weights the paper used (timm's default tags drift).
ALIASES: dict[str, str] = {
    "vit_base": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "resnet50_gn": "resnet50_gn.a1h_in1k",
    "resnet50": "resnet50.tv_in1k",
}

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".th", ".ckpt")


@dataclass
class LoadedModel:
    model: nn.Module
    spec: str
    """What the user asked for (``--model``)."""
    architecture: str
    source: str
    """registry, hf-hub, local-dir or checkpoint."""
    tag: str | None
    class_names: list[str]
    """Readable names (a ``ClassNames``, which also carries the class ids)."""
    data_config: dict[str, Any]
    weights_sha256: str
    checkpoint: str | None = None
    pretrained: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    def transform(self) -> Any:
        """The evaluation preprocessing of the model's ``pretrained_cfg`` (timm's create_transform),
        its tensor steps done per chunk of images where it allows (``sources.preprocess``)."""
        import timm.data

        from tta_cli.sources.preprocess import chunked

        return chunked(timm.data.create_transform(**self.data_config, is_training=False))

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "architecture": self.architecture,
            "source": self.source,
            "tag": self.tag,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "num_classes": self.num_classes,
            "weights_sha256": self.weights_sha256,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of the weights themselves (names, dtypes, shapes and bytes), whatever file held them."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _close_matches(name: str) -> list[str]:
    import timm

    candidates = list(ALIASES) + timm.list_models()
    base = name.split(".")[0]
    return difflib.get_close_matches(base, candidates, n=5, cutoff=0.6)


def resolve_name(spec: str) -> tuple[str, str]:
    """(timm model name, source kind) for ``--model``; unknown names get close matches."""
    import timm

    if spec.startswith("local-dir:"):
        path = Path(spec.removeprefix("local-dir:")).expanduser()
        if not (path / "config.json").is_file():
            raise TTAError(
                f"no timm model folder at {path}",
                "local-dir: needs a folder with config.json and model.safetensors",
            )
        check_model_config(path / "config.json")
        return f"local-dir:{path}", "local-dir"
    if spec.startswith("hf-hub:"):
        return spec, "hf-hub"
    name = ALIASES.get(spec, spec)
    if not timm.is_model(name):
        matches = _close_matches(name)
        hint = f"did you mean {', '.join(matches)}?" if matches else "see timm.list_models() or `tta models`"
        raise TTAError(f"unknown model {spec!r}", hint)
    return name, "registry"


_CONFIG_HINT = ("a timm model folder's config.json is a JSON object with an 'architecture' (a timm model name), "
                "as `tta adapt` writes it in --out/model")


def check_model_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of a ``local-dir:`` folder, checked before timm reads it: valid JSON, an
    object, and an ``architecture`` that timm knows (timm fails on each with an internal error)."""
    import timm

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise TTAError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}", _CONFIG_HINT) from None
    except json.JSONDecodeError as err:
        raise TTAError(f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})",
                       _CONFIG_HINT) from None
    if not isinstance(config, dict):
        raise TTAError(f"{path} holds a JSON {type(config).__name__}, not an object", _CONFIG_HINT)
    architecture = config.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise TTAError(f"{path} has no 'architecture'", _CONFIG_HINT)
    if not timm.is_model(architecture):
        matches = _close_matches(architecture)
        hint = f"did you mean {', '.join(matches)}?" if matches else _CONFIG_HINT
        raise TTAError(f"{path}: unknown architecture {architecture!r}", hint)
    return config


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Refuse weights (or buffers) holding NaN or infinity: every prediction would be NaN (or class 0)."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() and not tensor.is_complex():
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            raise TTAError(
                f"the weights from {where} are not finite: {name} holds {int(bad.sum())} NaN or infinite "
                f"values (of {tensor.numel()})",
                "the file is corrupt, or was saved after training diverged; use another checkpoint",
            )


Mismatch = tuple[str, tuple[int, ...], tuple[int, ...]]
"""A state-dict key, its shape in the file, its shape in the model."""


def _shape_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> Mismatch | None:
    """The first key (in the model's order) whose tensor has another shape in ``state``."""
    for name, tensor in model.state_dict().items():
        found = state.get(name)
        if found is not None and found.shape != tensor.shape:
            return name, tuple(found.shape), tuple(tensor.shape)
    return None


def _create(name: str, pretrained: bool, num_classes: int | None) -> nn.Module:
    import timm

    if pretrained and not name.startswith("local-dir:"):
        check_weights_available(name)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        text = str(err)
        if pretrained and ("offline" in text.lower() or "connect" in text.lower() or "cache" in text.lower()
                           or type(err).__name__.endswith(("NotFoundError", "ConnectionError", "HTTPError"))):
            raise TTAError(f"cannot load weights for {name}", offline_hint(name)) from err
        raise TTAError(f"cannot create model {name}: {_first_reason(text) or type(err).__name__}") from err
    except Exception as err:  # huggingface_hub errors do not share a base class with the above
        if pretrained and "huggingface" in type(err).__module__:
            raise TTAError(f"cannot load weights for {name}", offline_hint(name)) from err
        raise


def _first_reason(text: str) -> str:
    """The line of an error that says what is wrong (torch lists size mismatches below a heading)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))),
                  None)
    return detail or (lines[0] if lines else "")


def load_error_reason(err: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` (or safetensors) refused a file, in a few words: not
    torch's advice to load it with ``weights_only=False``, which would run the code a pickle holds."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        details = [line for line in lines if line.startswith("WeightsUnpickler error")]
        return "it holds more than plain tensors or is not a torch file" + (f" ({details[0]})" if details else "")
    return lines[0] if lines else type(err).__name__


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: safetensors, or a torch file read with ``weights_only=True`` only
    (never unpickling code), unwrapped from ``state_dict`` / ``model`` / ``module.``."""
    if not path.is_file():
        raise TTAError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise TTAError(
            f"cannot read checkpoint {path}: {load_error_reason(err)}",
            "expected a .safetensors file or a torch state dict saved with plain tensors",
        ) from err
    for key in ("state_dict", "model", "model_state", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TTAError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _checkpoint_num_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    names = [classifier] if isinstance(classifier, str) else list(classifier or [])
    for name in names:
        weight = state.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _load_checkpoint(model: nn.Module, name: str, path: Path, num_classes: int | None) -> nn.Module:
    state = read_checkpoint(path)
    if num_classes is None:
        found = _checkpoint_num_classes(model, state)
        if found is not None and found != model.num_classes:
            model = _create(name, False, found)
    mismatch = _shape_mismatch(model, state)
    if mismatch is not None:  # load_state_dict raises on these even when not strict
        key, found, expected = mismatch
        raise TTAError(
            f"{path.name} does not fit the architecture {name}: {key} has shape {list(found)} in the "
            f"checkpoint, {list(expected)} in the model",
            "check --model names the architecture the checkpoint was trained with (and --num-classes)",
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        problems = []
        if result.missing_keys:
            problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
        if result.unexpected_keys:
            problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
        raise TTAError(
            f"{path.name} does not fit the architecture {name}: " + "; ".join(problems),
            "check --model names the architecture the checkpoint was trained with (and --num-classes)",
        )
    return model


def class_names_of(model: nn.Module) -> ClassNames:
    """Readable class names with their ids, all offline: ids from the config's ``label_names``
    (else ImageNet's WordNet ids for an ImageNet head, else indices); names from its
    ``label_descriptions``, else ImageNet's lemmas for WordNet ids, else the ids."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    n = int(getattr(model, "num_classes", 0) or 0)
    ids = _label_ids(cfg.get("label_names"), n)
    info = _imagenet_info(model)
    if ids is None:
        ids = list(info.label_names()) if info is not None else [str(i) for i in range(n)]
    descriptions = cfg.get("label_descriptions")
    descriptions = descriptions if isinstance(descriptions, dict) else {}
    known = set(info.label_names()) if info is not None else set()
    names = [
        str(descriptions[i]) if i in descriptions
        else info.label_name_to_description(i) if info is not None and i in known
        else i
        for i in ids
    ]
    return ClassNames(names, ids)


def _label_ids(label_names: Any, n: int) -> list[str] | None:
    """``label_names`` as a list of n ids (timm allows a list or an index -> name dict with gaps)."""
    if isinstance(label_names, dict):
        label_names = [label_names.get(str(i), label_names.get(i, str(i))) for i in range(n)]
    if isinstance(label_names, (list, tuple)) and label_names and len(label_names) == n:
        return [str(x) for x in label_names]
    return None


def _imagenet_info(model: nn.Module) -> Any:
    """timm's bundled ImageNet class info for ImageNet-sized heads (1k, 12k, 21k, 22k), else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    return info if info.num_classes() == int(getattr(model, "num_classes", 0) or 0) else None


def load_model(
    spec: str,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Load ``--model`` (and optionally ``--checkpoint``) into a :class:`LoadedModel` on the CPU."""
    import timm.data

    name, source = resolve_name(spec)
    if checkpoint is not None:
        model = _create(name, False if source == "registry" else pretrained, num_classes)
        model = _load_checkpoint(model, name, Path(checkpoint), num_classes)
        source = "checkpoint"
    else:
        use_pretrained = pretrained or source == "local-dir"
        model = _create(name, use_pretrained, num_classes)
        pretrained = use_pretrained
    check_finite_weights(model, str(checkpoint) if checkpoint is not None else spec)
    model.eval()
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    data_config = timm.data.resolve_model_data_config(model)
    return LoadedModel(
        model=model,
        spec=spec,
        architecture=cfg.get("architecture", name),
        source=source,
        tag=cfg.get("tag") or None,
        class_names=class_names_of(model),
        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
        weights_sha256=state_dict_sha256(model.state_dict()),
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        pretrained=pretrained if checkpoint is None else True,
        extra={"hf_hub_id": cfg.get("hf_hub_id")},
    )


def export_model(loaded: LoadedModel, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """Write a timm model folder (config.json + model.safetensors) that
    ``timm.create_model("local-dir:DIR", pretrained=True)`` loads strictly."""
    from tta_cli.atomic import atomic_write_dir

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write_dir(directory, lambda folder: _write_model_folder(loaded, tensors, folder))


def _write_model_folder(loaded: LoadedModel, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    save_config_for_hf(
        loaded.model,
        str(directory / "config.json"),
        model_config=_label_config(loaded.class_names),
    )
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _label_config(class_names: list[str]) -> dict[str, Any]:
    """The ids as ``label_names`` and the readable names as ``label_descriptions`` (where they differ),
    so that the exported folder names its classes as the run did."""
    config: dict[str, Any] = {"label_names": class_ids_of(class_names)}
    descriptions = class_names.descriptions() if isinstance(class_names, ClassNames) else {}
    if descriptions:
        config["label_descriptions"] = descriptions
    return config


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())
