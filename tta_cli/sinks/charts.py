"""The charts of ``tta report``, drawn with Pillow (a core dependency): line charts along the
stream and grouped bar charts, with round tick values, axis titles and labels that fit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

ADAPTED, SOURCE, ACCENT, GRID, INK = "#1f77b4", "#ff7f0e", "#d62728", "#dddddd", "#222222"


@dataclass
class Series:
    name: str
    xs: list[float]
    ys: list[float]
    color: str = ADAPTED


# --- charts ------------------------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, count: int = 5, whole: bool = False) -> list[float]:
    """About ``count`` evenly spaced ticks from ``lo`` (rounded down) past ``hi``, the step 1, 2,
    2.5 or 5 times a power of ten (a whole number of at least 1 with ``whole``)."""
    span = max(hi - lo, 1e-12)
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw - 1e-12)
    if whole:
        step = max(1, math.ceil(step))
    start = math.floor(lo / step + 1e-9) * step
    ticks = [start]
    while ticks[-1] < hi - 1e-9:
        ticks.append(start + step * len(ticks))
    return ticks


def _tick_text(value: float, step: float, percent: bool, whole: bool) -> str:
    if percent:
        return f"{100 * value:.0f}%"
    if whole or step >= 1:
        return f"{value:.0f}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals + (1 if round(step / 10 ** -decimals, 6) % 1 else 0)}f}"


def _y_title(image: Image.Image, title: str, top: int, bottom: int, font: Any) -> None:
    """An axis title rotated along the left edge, centred on the plot's height."""
    probe = ImageDraw.Draw(image)
    width = int(probe.textlength(title, font=font)) + 4
    label = Image.new("RGB", (width, 16), "white")
    ImageDraw.Draw(label).text((width // 2, 8), title, fill=INK, font=font, anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (4, int((top + image.height - bottom) / 2 - rotated.height / 2)))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has one bitmap size
        return ImageFont.load_default()


def line_chart(title: str, series: Sequence[Series], y_range: tuple[float, float] | None = None,
               events: Sequence[int] = (), event_label: str = "reset", percent: bool = False,
               size: tuple[int, int] = (960, 300), threshold: float | None = None,
               y_title: str = "", x_title: str = "images in stream order") -> Image.Image:
    """Lines over the stream position, a vertical mark at each event, a legend, axis titles."""
    width, height = size
    left, right, top, bottom = 84, 20, 36, 44
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(16), _font(12)
    draw.text((left, 8), title, fill=INK, font=font)
    xs = [x for s in series for x in s.xs] + list(events)
    ys = [y for s in series for y in s.ys]
    x_max = max(xs, default=1) or 1
    if y_range is not None:
        lo, hi = y_range
        ticks = nice_ticks(lo, hi)
    else:
        ticks = nice_ticks(min(0.0, min(ys, default=0.0)), max(ys, default=1.0) or 1.0)
        lo, hi = ticks[0], ticks[-1]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0

    def point(x: float, y: float) -> tuple[float, float]:
        return (left + (width - left - right) * x / x_max,
                height - bottom - (height - top - bottom) * (y - lo) / (hi - lo))

    for value in ticks:
        _, y = point(0, value)
        draw.line([(left, y), (width - right, y)], fill=GRID)
        draw.text((left - 8, y), _tick_text(value, step, percent, False), fill=INK, font=small, anchor="rm")
    for x_value in nice_ticks(0, x_max, whole=True):
        if x_value > x_max:
            break
        x, _ = point(x_value, lo)
        draw.text((x, height - bottom + 6), f"{x_value:.0f}", fill=INK, font=small, anchor="mt")
    draw.text(((left + width - right) / 2, height - 4), x_title, fill=INK, font=small, anchor="md")
    if y_title:
        _y_title(image, y_title, top, bottom, small)
    if threshold is not None:
        _, y = point(0, threshold)
        draw.line([(left, y), (width - right, y)], fill=ACCENT, width=1)
    for event in events:
        x, _ = point(event, lo)
        draw.line([(x, top), (x, height - bottom)], fill=ACCENT, width=2)
    for s in series:
        points = [point(x, y) for x, y in zip(s.xs, s.ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=s.color, width=2)
        for px, py in points:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=s.color)
    legend = [(s.name, s.color) for s in series] + ([(event_label, ACCENT)] if events else [])
    x = width - right
    for name, color in reversed(legend):
        text_width = draw.textlength(name, font=small)
        x -= text_width + 24
        draw.rectangle([x, 14, x + 12, 24], fill=color)
        draw.text((x + 16, 19), name, fill=INK, font=small, anchor="lm")
    return image


def bar_chart(title: str, labels: list[str], groups: Sequence[tuple[str, list[int], str]],
              size: tuple[int, int] = (960, 380), y_title: str = "images",
              x_title: str = "predicted class") -> Image.Image:
    """Grouped vertical bars, one group per label, the labels written upwards underneath (the
    bottom margin fits the longest), whole-number ticks."""
    width, height = size
    font, small = _font(16), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest = max((probe.textlength(label, font=small) for label in labels), default=0)
    left, right, top, bottom = 70, 20, 36, int(longest) + 34
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill=INK, font=font)
    ticks = nice_ticks(0, max((v for _, values, _ in groups for v in values), default=1) or 1, whole=True)
    peak = ticks[-1]
    slot = (width - left - right) / max(1, len(labels))
    bar = slot * 0.8 / max(1, len(groups))
    for value in ticks:
        y = height - bottom - (height - top - bottom) * value / peak
        draw.line([(left, y), (width - right, y)], fill=GRID)
        draw.text((left - 8, y), f"{value:.0f}", fill=INK, font=small, anchor="rm")
    for i, label in enumerate(labels):
        x0 = left + slot * i + slot * 0.1
        for g, (_, values, color) in enumerate(groups):
            h = (height - top - bottom) * values[i] / peak
            draw.rectangle([x0 + bar * g, height - bottom - h, x0 + bar * (g + 1) - 1, height - bottom], fill=color)
        _vertical_label(image, label, (left + slot * i + slot / 2, height - bottom + 4), small)
    draw.text(((left + width - right) / 2, height - 4), x_title, fill=INK, font=small, anchor="md")
    _y_title(image, y_title, top, bottom, small)
    x = width - right
    for name, _, color in reversed(groups):
        x -= draw.textlength(name, font=small) + 24
        draw.rectangle([x, 14, x + 12, 24], fill=color)
        draw.text((x + 16, 19), name, fill=INK, font=small, anchor="lm")
    return image


def _vertical_label(image: Image.Image, text: str, anchor: tuple[float, float], font: Any) -> None:
    """``text`` written upwards, its end at ``anchor`` (under the bar), whole."""
    probe = ImageDraw.Draw(image)
    w = int(probe.textlength(text, font=font)) + 4
    label = Image.new("RGB", (w, 16), "white")
    ImageDraw.Draw(label).text((w - 2, 8), text, fill=INK, font=font, anchor="rm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (int(anchor[0] - rotated.width / 2), int(anchor[1])))


