"""CIFAR-10-C corruptions: each one's strength on synthetic images matches make_cifar_c.py's table."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tta_cli.bench import cifar_c
from tta_cli.bench.cifar_c import FUNCTIONS, corrupt_cifar
from tta_cli.bench.corrupt import KNOWN

GREY = np.full((32, 32, 3), 0.5)


def natural(size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth, textured colour image (a blurred random field plus a gradient) in [0, 1]."""
    rng = np.random.default_rng(seed)
    field = cifar_c.gaussian(rng.random((size, size, 3)), 2.0)
    field = (field - field.min()) / (field.max() - field.min())
    ramp = np.linspace(0, 1, size)[None, :, None]
    return np.clip(0.6 * field + 0.4 * ramp, 0, 1)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_every_corruption_has_a_function_and_keeps_shape_and_dtype() -> None:
    assert set(FUNCTIONS) == set(KNOWN) and len(FUNCTIONS) == 19
    pixels = np.uint8(natural() * 255)
    for name in FUNCTIONS:
        for severity in range(1, 6):
            out = corrupt_cifar(pixels, name, severity, rng())
            assert out.shape == pixels.shape and out.dtype == np.uint8, name
    wide = np.uint8(natural(48) * 255)[:40]  # not square, not a power of two
    for name in FUNCTIONS:
        assert corrupt_cifar(wide, name, 5, rng()).shape == wide.shape, name


def test_deterministic_for_a_seed_and_changed_by_another() -> None:
    pixels = np.uint8(natural() * 255)
    random_ones = [n for n in FUNCTIONS if n not in ("defocus_blur", "gaussian_blur", "zoom_blur", "contrast",
                                                     "brightness", "saturate", "jpeg_compression", "pixelate")]
    for name in FUNCTIONS:
        a, b = corrupt_cifar(pixels, name, 5, rng(3)), corrupt_cifar(pixels, name, 5, rng(3))
        assert np.array_equal(a, b), name
        if name in random_ones:
            assert not np.array_equal(a, corrupt_cifar(pixels, name, 5, rng(4))), name


@pytest.mark.parametrize("severity", range(1, 6))
def test_gaussian_noise_sigma(severity: int) -> None:
    big = np.full((256, 256, 3), 0.5)
    out = cifar_c.gaussian_noise(big, severity, rng())
    assert abs(out.std() - cifar_c.GAUSSIAN_NOISE[severity - 1]) < 0.003
    assert abs(out.mean() - 0.5) < 0.003


def test_gaussian_noise_is_cifar_strength_not_imagenet() -> None:
    assert cifar_c.GAUSSIAN_NOISE == (0.04, 0.06, 0.08, 0.09, 0.10)


@pytest.mark.parametrize("severity", range(1, 6))
def test_shot_and_speckle_noise_strength(severity: int) -> None:
    big = np.full((256, 256, 3), 0.5)
    lam = cifar_c.SHOT_NOISE[severity - 1]
    assert abs(cifar_c.shot_noise(big, severity, rng()).std() - np.sqrt(0.5 * lam) / lam) < 0.004
    speckle = cifar_c.speckle_noise(big, severity, rng())
    assert abs(speckle.std() - 0.5 * cifar_c.SPECKLE_NOISE[severity - 1]) < 0.003


@pytest.mark.parametrize("severity", range(1, 6))
def test_impulse_noise_amount(severity: int) -> None:
    big = np.full((256, 256, 3), 0.5)
    out = cifar_c.impulse_noise(big, severity, rng())
    changed = out != 0.5
    assert abs(changed.mean() - cifar_c.IMPULSE_NOISE[severity - 1]) < 0.003
    assert abs((out[changed] == 1).mean() - 0.5) < 0.05  # salt and pepper in equal parts


@pytest.mark.parametrize("severity", range(1, 6))
def test_contrast_scales_the_deviation(severity: int) -> None:
    image = natural()
    out = cifar_c.contrast(image, severity, rng())
    deviation = image - image.mean(axis=(0, 1))
    assert np.allclose(out - out.mean(axis=(0, 1)), deviation * cifar_c.CONTRAST[severity - 1], atol=1e-9)


def test_brightness_raises_value_and_keeps_hue() -> None:
    grey = cifar_c.brightness(GREY, 5, rng())
    assert np.allclose(grey, 0.5 + cifar_c.BRIGHTNESS[4])
    image = natural()
    out = cifar_c.brightness(image, 3, rng())
    hsv_in, hsv_out = cifar_c.rgb_to_hsv(image), cifar_c.rgb_to_hsv(out)
    assert np.allclose(hsv_out[..., 2], np.clip(hsv_in[..., 2] + cifar_c.BRIGHTNESS[2], 0, 1), atol=1e-9)
    assert np.allclose(hsv_out[..., :2], hsv_in[..., :2], atol=1e-9)


def test_hsv_round_trip_and_saturation() -> None:
    image = natural()
    assert np.allclose(cifar_c.hsv_to_rgb(cifar_c.rgb_to_hsv(image)), image, atol=1e-12)
    faded = cifar_c.rgb_to_hsv(cifar_c.saturate(image, 2, rng()))
    assert np.allclose(faded[..., 1], cifar_c.rgb_to_hsv(image)[..., 1] * 0.1, atol=1e-9)
    # Severity 5 adds 0.2 saturation; grey has hue 0 (red) in the hexcone model, as in skimage.
    assert np.allclose(cifar_c.saturate(GREY, 5, rng()), [0.5, 0.4, 0.4])


@pytest.mark.parametrize("severity", range(1, 6))
def test_jpeg_quality(severity: int) -> None:
    pixels = np.uint8(natural() * 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=cifar_c.JPEG_QUALITY[severity - 1])
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    assert np.array_equal(corrupt_cifar(pixels, "jpeg_compression", severity, rng()), expected)


def test_blur_strength_grows_with_severity_and_keeps_flat_images() -> None:
    image = natural(seed=2)
    sharp = np.abs(np.diff(image, axis=1)).mean()
    for name in ("defocus_blur", "gaussian_blur", "zoom_blur", "glass_blur", "motion_blur"):
        edges = [np.abs(np.diff(FUNCTIONS[name](image, s, rng()), axis=1)).mean() for s in (1, 5)]
        assert edges[1] < edges[0], name
        if name != "glass_blur":  # glass blur also shuffles pixels locally, which adds edges
            assert edges[0] <= sharp * 1.02, name
        assert np.allclose(FUNCTIONS[name](GREY, 5, rng()), GREY, atol=1 / 255 + 1e-9), name


def test_defocus_kernel_is_a_normalised_disk() -> None:
    small = cifar_c.disk_kernel(0.3, 0.4)
    assert small.shape == (17, 17) and abs(small.sum() - 1) < 1e-12
    assert np.count_nonzero(small > 1e-9) == 9  # radius 0.3: one pixel, smoothed 3 x 3
    large = cifar_c.disk_kernel(1.5, 0.1)
    assert np.count_nonzero(large > 1e-3) == 9  # the centre, 4 at distance 1 and 4 at sqrt(2)
    assert abs(large.sum() - 1) < 1e-12


def test_gaussian_blur_sigma() -> None:
    impulse = np.zeros((33, 33, 1))
    impulse[16, 16] = 1
    out = cifar_c.gaussian(impulse, cifar_c.GAUSSIAN_BLUR[4])[..., 0]
    coords = np.arange(33) - 16
    variance = (out.sum(0) * coords ** 2).sum()
    assert abs(variance - 1.0) < 0.01


def test_motion_kernel_is_a_one_sided_line() -> None:
    weights, offsets = cifar_c.motion_kernel_offsets(9, 2.5, 0.0)
    assert len(weights) == 19 and abs(weights.sum() - 1) < 1e-12 and weights[0] == weights.max()
    assert (offsets[:, 0] == 0).all() and (offsets[:, 1] == np.arange(19)).all()
    _, diagonal = cifar_c.motion_kernel_offsets(6, 1, 45.0)
    assert (diagonal[:, 0] == diagonal[:, 1]).all()


def test_pixelate_blocks() -> None:
    out = cifar_c.pixelate(natural(), 5, rng())  # 32 -> 20 -> 32
    assert len(np.unique(out[..., 0].round(6), axis=0)) < 32


def test_fog_frost_snow_strength_grows() -> None:
    image = natural(seed=1)
    for name in ("fog", "snow", "spatter"):
        change = [np.abs(FUNCTIONS[name](image, s, rng(5)) - image).mean() for s in (1, 5)]
        assert change[1] > change[0] > 0 or (name == "spatter" and change[1] > 0), (name, change)
    # Fog at severity 5: strength 1.5 of fractal on top, rescaled to the image's peak.
    foggy = cifar_c.fog(GREY, 5, rng())
    assert foggy.std() > 0.05 and foggy.max() <= 0.5 + 1e-9


@pytest.mark.parametrize("severity", range(1, 6))
def test_frost_blend_weights(severity: int) -> None:
    dark = natural() * 0.3  # dark enough that nothing clips
    keep, amount = cifar_c.FROST[severity - 1]
    texture = cifar_c.frost_texture(32, 32, rng(9))
    assert 0.35 < texture.mean() < 0.75 and texture.max() <= 1
    assert np.allclose(cifar_c.frost(dark, severity, rng(9)), np.clip(keep * dark + amount * texture, 0, 1))


def test_elastic_moves_pixels_but_not_flat_images() -> None:
    """Not monotone in the table: severity 1 is a large affine jitter, 5 a small one plus a
    strong elastic field (make_cifar_c.py's values)."""
    image = natural(seed=1)
    for severity in range(1, 6):
        assert np.abs(cifar_c.elastic_transform(image, severity, rng()) - image).mean() > 0.005
        assert np.allclose(cifar_c.elastic_transform(GREY, severity, rng()), 0.5, atol=1e-9)


def test_glass_blur_copies_neighbours() -> None:
    """The original's numpy "swap" copies the neighbour's pixel: values only ever repeat."""
    pixels = np.uint8(natural() * 255)
    out = np.uint8(cifar_c.glass_blur(pixels / 255, 1, rng()) * 255 + 0.5)  # sigma 0.05: no blur
    colours = {tuple(p) for p in pixels.reshape(-1, 3)}
    assert all(tuple(p) in colours for p in out.reshape(-1, 3))
    assert not np.array_equal(out, pixels)
    assert len({tuple(p) for p in out.reshape(-1, 3)}) < len(colours)  # copies, not swaps
