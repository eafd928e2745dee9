"""Readable class names with their ids: from the model folder, ImageNet's info, or indices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf

from tta_cli.classes import ClassNames, class_ids_of
from tta_cli.models import export_model, load_model
from tta_cli.sources.labels import LabelMap

WNIDS = ["n01440764", "n01443537", "n01484850"]
DESCRIPTIONS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish", "n01484850": "great white shark"}


def _folder(tmp_path: Path, model_config: dict) -> Path:
    tmp_path.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    save_config_for_hf(model, str(tmp_path / "config.json"), model_config=model_config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_class_names_carry_ids_and_descriptions() -> None:
    names = ClassNames(["tench", "goldfish"], ["n01440764", "n01443537"])
    assert list(names) == ["tench", "goldfish"] and names.ids == ["n01440764", "n01443537"]
    assert names.descriptions() == {"n01440764": "tench", "n01443537": "goldfish"}
    assert class_ids_of(["a", "b"]) == ["a", "b"] and class_ids_of(names) == names.ids
    with pytest.raises(ValueError):
        ClassNames(["a"], ["x", "y"])


def test_local_dir_descriptions_are_the_readable_names(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"label_names": WNIDS, "label_descriptions": DESCRIPTIONS})
    loaded = load_model(f"local-dir:{folder}")
    assert list(loaded.class_names) == ["tench, Tinca tinca", "goldfish", "great white shark"]
    assert loaded.class_names.ids == WNIDS


def test_local_dir_wordnet_ids_without_descriptions_get_imagenet_lemmas_only_for_imagenet_heads(
        tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"label_names": WNIDS})
    loaded = load_model(f"local-dir:{folder}")  # 3 classes: not an ImageNet head, the ids stay
    assert list(loaded.class_names) == WNIDS


def test_imagenet_head_gets_lemmas_and_wordnet_ids() -> None:
    loaded = load_model("test_resnet", pretrained=False)
    assert loaded.class_names[0] == "tench, Tinca tinca" and loaded.class_names.ids[0] == "n01440764"
    assert len(set(loaded.class_names.ids)) == 1000


def test_plain_head_is_indices() -> None:
    loaded = load_model("test_resnet", pretrained=False, num_classes=4)
    assert list(loaded.class_names) == ["0", "1", "2", "3"] and loaded.class_names.ids == ["0", "1", "2", "3"]


def test_export_keeps_ids_and_descriptions(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "m", {"label_names": WNIDS, "label_descriptions": DESCRIPTIONS})
    loaded = load_model(f"local-dir:{folder}")
    export_model(loaded, loaded.model.state_dict(), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["label_names"] == WNIDS and config["label_descriptions"] == DESCRIPTIONS
    again = load_model(f"local-dir:{tmp_path / 'out'}")
    assert list(again.class_names) == list(loaded.class_names) and again.class_names.ids == WNIDS


def test_export_of_imagenet_head_names_its_classes(tmp_path: Path) -> None:
    loaded = load_model("test_resnet", pretrained=False)
    export_model(loaded, loaded.model.state_dict(), tmp_path / "out")
    again = load_model(f"local-dir:{tmp_path / 'out'}")
    assert again.class_names[:3] == loaded.class_names[:3] and again.class_names.ids == loaded.class_names.ids


def test_labels_may_be_index_id_or_name() -> None:
    names = ClassNames(["tench, Tinca tinca", "crane", "crane"], ["n01440764", "n02012849", "n03126707"])
    labels = LabelMap(names)
    assert labels.lookup("n01440764") == labels.lookup("tench, Tinca tinca") == labels.lookup("0") == 0
    assert labels.lookup("TENCH, tinca tinca") == 0
    assert labels.lookup("n03126707") == 2  # the id tells the two cranes apart
    assert labels.lookup("crane") == 1  # a name shared by two classes means the first
    assert labels.lookup("n99999999") is None and labels.lookup("7") is None
