"""Model loading: registry names, aliases, hf-hub: and local-dir:, checkpoint files, errors, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.helpers import save_timm_folder
from tta_cli.errors import TTAError
from tta_cli.models import (
    ALIASES,
    export_model,
    load_model,
    read_checkpoint,
    resolve_name,
    state_dict_sha256,
)


def test_aliases_resolve_to_the_papers_weights() -> None:
    assert resolve_name("vit_base") == ("vit_base_patch16_224.augreg_in21k_ft_in1k", "registry")
    assert resolve_name("resnet50_gn")[0] == "resnet50_gn.a1h_in1k"
    assert resolve_name("resnet50")[0] == "resnet50.tv_in1k"
    assert all(timm.is_model(name) for name in ALIASES.values())


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(TTAError) as err:
        resolve_name("resnet5O")
    assert "unknown model" in str(err.value) and "resnet50" in str(err.value)


def test_local_dir_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TTAError, match="no timm model folder"):
        load_model(f"local-dir:{tmp_path}")


def test_local_dir_loads_with_class_names_and_preprocessing(tiny_model_dir: Path) -> None:
    loaded = load_model(f"local-dir:{tiny_model_dir}")
    assert loaded.source == "local-dir" and loaded.num_classes == 10
    assert loaded.class_names[0] == "airplane"
    assert loaded.data_config["input_size"] == [3, 32, 32]
    assert len(loaded.weights_sha256) == 64
    assert loaded.transform() is not None


def test_registry_name_without_pretrained() -> None:
    loaded = load_model("test_resnet", pretrained=False, num_classes=7)
    assert loaded.num_classes == 7 and loaded.class_names == [str(i) for i in range(7)]
    assert loaded.tag == "r160_in1k" and loaded.data_config["input_size"] == [3, 160, 160]


def test_imagenet_models_get_imagenet_class_names() -> None:
    loaded = load_model("test_resnet", pretrained=False)
    assert loaded.num_classes == 1000 and loaded.class_names[0].lower().startswith("tench")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_checkpoint_files_load_and_unwrap(suffix: str, tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", pretrained=False, num_classes=5)
    state = source.state_dict()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # a training checkpoint: wrapped and DataParallel-prefixed
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = load_model("test_resnet", checkpoint=path)
    assert loaded.source == "checkpoint" and loaded.num_classes == 5  # read from the checkpoint's head
    assert loaded.weights_sha256 == state_dict_sha256(state)


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "callback": print}, path)  # a pickled callable, not a tensor
    with pytest.raises(TTAError, match="cannot read checkpoint"):
        read_checkpoint(path)


def test_checkpoint_for_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    vit = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(TTAError, match="does not fit the architecture"):
        load_model("test_resnet", checkpoint=path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TTAError, match="checkpoint not found"):
        load_model("test_resnet", checkpoint=tmp_path / "nope.pth")


def test_export_round_trip_keeps_names_and_preprocessing(tiny_model_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(f"local-dir:{tiny_model_dir}")
    export_model(loaded, loaded.model.state_dict(), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["label_names"][0] == "airplane"
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    again = load_model(f"local-dir:{tmp_path / 'out'}")
    assert again.weights_sha256 == loaded.weights_sha256


def _fake_hf_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face hub cache laid out as huggingface_hub writes it."""
    commit = "0" * 40
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def _run_offline(code: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(3)
    model = timm.create_model("test_resnet", pretrained=False)
    folder = save_timm_folder(model, root / "export")
    files = {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _fake_hf_cache(root / "hub", "timm/test_resnet.r160_in1k", files)
    return root / "hub", state_dict_sha256(model.state_dict())


@pytest.mark.parametrize("spec", ["test_resnet.r160_in1k", "hf-hub:timm/test_resnet.r160_in1k"])
def test_pretrained_weights_from_an_offline_cache(spec: str, hf_cache: tuple[Path, str]) -> None:
    cache, sha = hf_cache
    code = f"from tta_cli.models import load_model; print(load_model({spec!r}).weights_sha256)"
    result = _run_offline(code, cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == sha


def test_weights_missing_offline_say_how_to_get_them(tmp_path: Path) -> None:
    code = (
        "from tta_cli.models import load_model\n"
        "from tta_cli.errors import TTAError\n"
        "try:\n    load_model('test_vit')\nexcept TTAError as e:\n    print('TTAError', e)\n"
    )
    result = _run_offline(code, tmp_path / "empty-hub")
    assert "TTAError cannot load weights for test_vit" in result.stdout, result.stderr[-2000:]
    assert "--no-pretrained" in result.stdout


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ('{"num_classes": 10}', "has no 'architecture'"),
    ('{"architecture": "no_such_net_v9"}', "unknown architecture 'no_such_net_v9'"),
    ('{"architecture": ', "is not valid JSON (line 1"),
])
def test_bad_config_json_is_a_clear_error(content: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(TTAError) as err:
        load_model(f"local-dir:{tmp_path}")
    assert message in err.value.message and "config.json" in err.value.message
    assert err.value.hint and "architecture" in err.value.hint


def test_checkpoint_with_a_wrong_shape_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.ndim == 4)  # the first convolution
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1], 1, 1)
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(TTAError) as err:
        load_model("test_resnet", checkpoint=path, num_classes=7)
    expected = list(model.state_dict()[key].shape)
    assert key in err.value.message
    assert f"[{expected[0]}, {expected[1]}, 1, 1] in the checkpoint, {expected} in the model" in err.value.message


def test_local_dir_with_wrong_shaped_weights_names_the_key(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(3, state["head.weight"].shape[1])
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(TTAError, match=r"size mismatch for head\.weight"):
        load_model(f"local-dir:{folder}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_time(bad: float, tmp_path: Path) -> None:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=7)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    state[key].view(-1)[:3] = bad
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(TTAError) as err:
        load_model("test_resnet", checkpoint=path, num_classes=7)
    assert f"{key} holds 3 NaN or infinite values" in err.value.message
    assert "another checkpoint" in (err.value.hint or "")


def test_non_finite_local_dir_weights_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = load_model(f"local-dir:{tiny_model_dir}").model
    model.head.bias.data[0] = float("nan")
    folder = save_timm_folder(model, tmp_path / "nan_model", [str(i) for i in range(10)])
    with pytest.raises(TTAError, match=r"head\.bias holds 1 NaN"):
        load_model(f"local-dir:{folder}")
