"""Corrupted copies of a class-foldered image set: CIFAR-10-C or ImageNet-C parameters.

Two parameter presets: ``cifar``, the severities of Hendrycks' CIFAR-10-C (``bench/cifar_c.py``,
numpy/scipy/PIL, for small images) and ``imagenet``, ImageNet-C's (made for 224 px images, with the
``corrupt-tta`` package). ``auto`` picks ``cifar`` for images of at most ``SMALL_IMAGE`` pixels a
side (after ``--crop``), judged on the first image of the set.

Output layout (the ImageNet-C one): ``DST/<corruption>/<severity>/<class>/<name>.png`` plus
``DST/corrupt.json`` recording how it was made. Every image is corrupted with numpy's global
generator seeded from (seed, corruption, severity, image path), so an image's pixels do not depend on
which other images, corruptions or severities are written in the same call, and a rerun resumes.
With the cifar preset each image has its
own ``numpy.random.Generator`` seeded from the same words. ``corrupt_tta``'s impulse_noise draws
from an unseeded scikit-image generator; it is given a seeded one while corrupting (the trap noted
in the benchmark spec).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import random
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from tta_cli.errors import TTAError

# The 15 test corruptions of ImageNet-C, in the order of its paper's tables.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
# The 4 held-out corruptions: the only ones hyperparameters may be tuned on.
HELD_OUT: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
KNOWN: tuple[str, ...] = CORRUPTIONS + HELD_OUT
# "clean" writes the images as they are (after --crop): the uncorrupted reference in the same layout.
CLEAN = "clean"
MANIFEST = "corrupt.json"
PRESETS: tuple[str, ...] = ("auto", "cifar", "imagenet")
SMALL_IMAGE = 64
"""auto: images with both sides at most this many pixels get the CIFAR-10-C parameters."""
INSTALL_HINT = 'install the optional extra: pip install "tta-cli[bench]" (or pip install corrupt-tta)'


def import_corrupt_tta() -> ModuleType:
    """The ``corrupt_tta`` module, or a user error that says how to install it."""
    try:
        import corrupt_tta
    except ImportError as err:
        raise TTAError("corrupting images needs the corrupt-tta package, which is not installed",
                       INSTALL_HINT) from err
    return corrupt_tta


def import_scipy() -> None:
    """The CIFAR-10-C corruptions need scipy: a user error that says how to install it."""
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError as err:
        raise TTAError("the CIFAR-10-C corruptions need scipy, which is not installed", INSTALL_HINT) from err


def parse_corruptions(text: str | Sequence[str]) -> list[str]:
    """``all`` (the 15), ``held-out`` (the 4), ``clean`` or names, comma-separated or repeated."""
    parts = [text] if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in parts:
        for name in (p.strip().lower().replace("-", "_") for p in part.split(",")):
            if not name:
                continue
            expanded = {"all": CORRUPTIONS, "held_out": HELD_OUT}.get(name, (name,))
            for item in expanded:
                _check_corruption(item)
                if item not in names:
                    names.append(item)
    if not names:
        raise TTAError("no corruption given", "use all, held-out, or names such as fog,snow")
    return names


def _check_corruption(name: str) -> None:
    if name not in (*KNOWN, CLEAN):
        close = difflib.get_close_matches(name, KNOWN, n=3)
        choices = f"choose from all, held-out, clean, {', '.join(KNOWN)}"
        hint = f"did you mean {', '.join(close)}?" if close else choices
        raise TTAError(f"unknown corruption {name!r}", hint)


def parse_severities(text: str) -> list[int]:
    """``5``, ``3,5`` or a range ``1-5``; each in 1..5."""
    found: list[int] = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        low, sep, high = part.partition("-")
        try:
            values = range(int(low), int(high) + 1) if sep else [int(part)]
        except ValueError:
            raise TTAError(f"invalid severity {part!r}",
                           "use a number 1-5, a list 3,5 or a range 1-5") from None
        for value in values:
            if not 1 <= value <= 5:
                raise TTAError(f"severity {value} is out of range", "severities go from 1 to 5")
            if value not in found:
                found.append(value)
    if not found:
        raise TTAError("no severity given", "use a number 1-5")
    return found


@dataclass(frozen=True)
class SourceImage:
    """One image of the clean set: its path relative to the set, and its class folder."""

    rel: str
    class_name: str
    path: Path


def list_class_images(src: Path) -> list[SourceImage]:
    """The images of a class-foldered set (``SRC/<class>/...``), in natural order."""
    from tta_cli.sources.folder import IMAGE_SUFFIXES, list_images

    if not src.is_dir():
        raise TTAError(f"input folder not found: {src}")
    relative = list_images(src)
    if not relative:
        raise TTAError(f"no images in {src}", f"looked for {', '.join(sorted(IMAGE_SUFFIXES))}")
    loose = [rel for rel in relative if "/" not in rel]
    if loose:
        raise TTAError(f"{src} is not class-foldered: {len(loose)} images at its top level (e.g. {loose[0]})",
                       "put each class's images in a subfolder named after the class")
    return [SourceImage(rel, rel.split("/", 1)[0], src / rel) for rel in relative]


def select_images(images: Sequence[SourceImage], limit: int | None, seed: int) -> list[SourceImage]:
    """A seeded sample of ``limit`` images (all if None), in the set's order: the same images
    for every corruption and severity."""
    if limit is None or limit >= len(images):
        return list(images)
    if limit < 1:
        raise TTAError("--limit must be at least 1")
    chosen = sorted(random.Random(seed).sample(range(len(images)), limit))
    return [images[i] for i in chosen]


@contextlib.contextmanager
def seeded_impulse_noise(module: ModuleType) -> Iterator[None]:
    """While open, impulse_noise's scikit-image generator is seeded from numpy's global one."""
    corruptions = module.corruptions
    unseeded: Callable[..., Any] = corruptions.random_noise

    def seeded(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("rng", int(np.random.randint(2**31)))
        return unseeded(*args, **kwargs)

    corruptions.random_noise = seeded
    try:
        yield
    finally:
        corruptions.random_noise = unseeded


def image_seed(seed: int, corruption: str, severity: int, rel: str) -> list[int]:
    """numpy seed words for one image: stable across runs and independent of the other images
    (crc32 rather than hash(), which Python salts per process)."""
    index = KNOWN.index(corruption) if corruption in KNOWN else len(KNOWN)
    return [seed, index, severity, zlib.crc32(rel.encode())]


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """The central ``size`` square; a smaller image is first resized so its short side is ``size``."""
    w, h = image.size
    if min(w, h) < size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_rgb(path: Path, crop: int | None) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if crop:
        rgb = centre_crop(rgb, crop)
    return np.asarray(rgb)


def parse_preset(text: str) -> str:
    name = text.strip().lower()
    if name not in PRESETS:
        raise TTAError(f"unknown preset {text!r}", f"choose from {', '.join(PRESETS)}")
    return name


def preset_for_size(width: int, height: int) -> str:
    return "cifar" if max(width, height) <= SMALL_IMAGE else "imagenet"


def detect_preset(images: Sequence[SourceImage], crop: int | None) -> str:
    """auto's choice: by the size of the first image (as it will be corrupted, after the crop)."""
    if crop:
        return preset_for_size(crop, crop)
    for image in images:
        try:
            with Image.open(image.path) as first:
                return preset_for_size(*first.size)
        except OSError:
            continue  # an unreadable file is reported when it is corrupted
    return "imagenet"


def corrupt_array(module: ModuleType | None, pixels: np.ndarray, corruption: str, severity: int,
                  seed_words: list[int]) -> np.ndarray:
    """One corrupted image as uint8: CIFAR-10-C parameters when ``module`` is None, else
    corrupt-tta's ImageNet-C ones (it returns floats in [0, 255], unclipped for some)."""
    if corruption == CLEAN:
        return pixels
    if module is None:
        from tta_cli.bench.cifar_c import corrupt_cifar

        return corrupt_cifar(pixels, corruption, severity, np.random.default_rng(seed_words))
    np.random.seed(seed_words)
    out = module.corrupt(pixels, severity=severity, corruption_name=corruption)
    return np.clip(np.asarray(out), 0, 255).astype(np.uint8)


@dataclass
class CorruptPlan:
    """What ``tta corrupt`` writes: every selected image x corruption x severity."""

    src: Path
    dst: Path
    corruptions: list[str]
    severities: list[int] = field(default_factory=lambda: [5])
    seed: int = 0
    limit: int | None = None
    crop: int | None = None
    preset: str = "auto"
    """auto, cifar or imagenet; auto is replaced by the choice on first use."""

    def concrete_preset(self) -> str:
        if self.preset == "auto":
            self.preset = detect_preset(list_class_images(self.src), self.crop)
        return self.preset

    def identity(self) -> dict[str, Any]:
        """The settings that change pixels of an existing file: a resumed run must share them."""
        return {"source": str(self.src.resolve()), "seed": self.seed, "limit": self.limit, "crop": self.crop,
                "preset": self.concrete_preset()}


@dataclass
class CorruptReport:
    images: int = 0
    written: int = 0
    existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def output_path(dst: Path, corruption: str, severity: int, rel: str) -> Path:
    return dst / corruption / str(severity) / Path(rel).with_suffix(".png")


def check_destination(plan: CorruptPlan, overwrite: bool) -> dict[str, Any]:
    """The existing manifest, if it was made with the same identity (else an error)."""
    path = plan.dst / MANIFEST
    if not path.is_file():
        if plan.dst.is_dir() and any(plan.dst.iterdir()) and not overwrite:
            raise TTAError(f"output folder {plan.dst} is not empty and was not made by tta corrupt",
                           "choose another destination or pass --overwrite")
        return {}
    previous = json.loads(path.read_text())
    previous.setdefault("preset", "imagenet")  # made before the presets existed
    differ = {k: v for k, v in plan.identity().items() if previous.get(k) != v}
    if not overwrite and differ:
        made = ", ".join(f"{k} {previous.get(k)} (now {v})" for k, v in differ.items())
        raise TTAError(f"{plan.dst} was made with other settings ({MANIFEST}: {made})",
                       "use the same source and --seed/--limit/--crop/--preset to add to it, another "
                       "destination, or --overwrite")
    return previous if not overwrite else {}


def _parameters(module: ModuleType | None) -> dict[str, Any]:
    if module is not None:
        return {"parameters": "ImageNet-C (corrupt-tta)", "corrupt_tta": getattr(module, "__version__", "unknown")}
    from tta_cli.bench.cifar_c import APPROXIMATED

    return {"parameters": "CIFAR-10-C (make_cifar_c.py severities, tta_cli.bench.cifar_c)",
            "approximated": APPROXIMATED}


def _write_manifest(plan: CorruptPlan, previous: dict[str, Any], module: ModuleType | None,
                    n_images: int) -> None:
    made = set(previous.get("corruptions", [])) | set(plan.corruptions)
    corruptions = [c for c in (*KNOWN, CLEAN) if c in made]
    severities = sorted(set(previous.get("severities", [])) | set(plan.severities))
    record = plan.identity() | {
        "tool": "tta corrupt",
        "corruptions": corruptions,
        "severities": severities,
        "images_per_corruption": n_images,
        "layout": "<corruption>/<severity>/<class>/<name>.png",
        "numpy": np.__version__,
    } | _parameters(module)
    (plan.dst / MANIFEST).write_text(json.dumps(record, indent=2))


def corrupt_folder(plan: CorruptPlan, overwrite: bool = False,
                   on_image: Callable[[], None] | None = None) -> CorruptReport:
    """Write the corrupted copies; existing files of a compatible earlier run are kept (resume)."""
    module = import_corrupt_tta() if plan.concrete_preset() == "imagenet" else None
    if module is None:
        import_scipy()
    images = select_images(list_class_images(plan.src), plan.limit, plan.seed)
    previous = check_destination(plan, overwrite)
    plan.dst.mkdir(parents=True, exist_ok=True)
    report = CorruptReport(images=len(images))
    with seeded_impulse_noise(module) if module is not None else contextlib.nullcontext():
        for image in images:
            _corrupt_one(module, plan, image, overwrite and not previous, report)
            if on_image is not None:
                on_image()
    _write_manifest(plan, previous, module, len(images))
    return report


def _corrupt_one(module: ModuleType | None, plan: CorruptPlan, image: SourceImage, overwrite: bool,
                 report: CorruptReport) -> None:
    """Every corruption and severity of one image (decoded once)."""
    targets = [(c, s, output_path(plan.dst, c, s, image.rel))
               for c in plan.corruptions for s in plan.severities]
    todo = [t for t in targets if overwrite or not t[2].is_file()]
    report.existing += len(targets) - len(todo)
    if not todo:
        return
    try:
        pixels = load_rgb(image.path, plan.crop)
    except Exception as err:  # an unreadable file is reported, not fatal
        report.failed.append((image.rel, f"{type(err).__name__}: {err}"))
        return
    for corruption, severity, path in todo:
        out = corrupt_array(module, pixels, corruption, severity,
                            image_seed(plan.seed, corruption, severity, image.rel))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(path)
        report.written += 1
