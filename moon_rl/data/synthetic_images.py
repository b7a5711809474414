"""The synthetic catalogue's product photos: a category silhouette filled with a colour and a pattern on a pale
backdrop (moon_rl/data/synthetic.py decides what each product is; this module only draws). `builtin:tiny-vl`'s vision
tower is pre-trained on the same swatches (moon_rl/modeling/tiny_vision.py)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

__all__ = ["BACKGROUNDS", "SILHOUETTES", "draw_view", "pale_background", "pattern_fill"]


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0, a1: float = 360, n: int = 28) -> list:
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n).tolist()]  # fmt: skip


def _rect(x0: float, y0: float, x1: float, y1: float) -> list:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Silhouettes in unit coordinates (y down): ("+", polygon) adds to the mask, ("-", polygon) cuts a hole.
SILHOUETTES: dict[str, list[tuple[str, list]]] = {
    "shirt": [("+", [(0.35, 0.15), (0.43, 0.15), (0.5, 0.23), (0.57, 0.15), (0.65, 0.15), (0.88, 0.32), (0.8, 0.44),
                     (0.7, 0.38), (0.7, 0.88), (0.3, 0.88), (0.3, 0.38), (0.2, 0.44), (0.12, 0.32)])],
    "dress": [("+", [(0.4, 0.1), (0.45, 0.1), (0.47, 0.2), (0.53, 0.2), (0.55, 0.1), (0.6, 0.1), (0.62, 0.3),
                     (0.57, 0.45), (0.85, 0.9), (0.15, 0.9), (0.43, 0.45), (0.38, 0.3)])],
    "trousers": [("+", [(0.3, 0.1), (0.7, 0.1), (0.77, 0.9), (0.56, 0.9), (0.5, 0.38), (0.44, 0.9), (0.23, 0.9)])],
    "shoe": [("+", [(0.1, 0.62), (0.12, 0.45), (0.22, 0.42), (0.3, 0.3), (0.45, 0.3), (0.5, 0.42), (0.72, 0.5),
                    (0.88, 0.58), (0.9, 0.7), (0.1, 0.7)])],
    "handbag": [("+", _ellipse(0.5, 0.44, 0.22, 0.26, 180, 360)), ("-", _ellipse(0.5, 0.44, 0.15, 0.19, 180, 360)),
                ("+", [(0.2, 0.42), (0.8, 0.42), (0.88, 0.85), (0.12, 0.85)])],
    "hat": [("+", _ellipse(0.5, 0.68, 0.42, 0.08)), ("+", _ellipse(0.5, 0.67, 0.22, 0.36, 180, 360))],
    "watch": [("+", _rect(0.4, 0.08, 0.6, 0.92)), ("+", _ellipse(0.5, 0.5, 0.2, 0.2)),
              ("+", _rect(0.69, 0.46, 0.75, 0.54))],
    "lamp": [("+", [(0.35, 0.12), (0.65, 0.12), (0.79, 0.42), (0.21, 0.42)]), ("+", _rect(0.47, 0.42, 0.53, 0.8)),
             ("+", _ellipse(0.5, 0.84, 0.2, 0.06))],
    "mug": [("+", _ellipse(0.68, 0.55, 0.17, 0.18)), ("-", _ellipse(0.68, 0.55, 0.09, 0.1)),
            ("+", _rect(0.2, 0.25, 0.68, 0.85))],
    "umbrella": [("+", _ellipse(0.5, 0.47, 0.42, 0.32, 180, 360)), ("+", _rect(0.485, 0.47, 0.515, 0.82)),
                 ("+", _ellipse(0.44, 0.82, 0.075, 0.075, 0, 180)), ("-", _ellipse(0.44, 0.82, 0.04, 0.04, 0, 180))],
}  # fmt: skip
BACKGROUNDS = ((236, 232, 222), (218, 228, 240), (224, 240, 224), (242, 226, 230), (228, 228, 228),
               (245, 240, 212), (214, 214, 226), (206, 222, 222))  # fmt: skip


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def pale_background(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int],
                    np_rng: np.random.Generator) -> Image.Image:
    """A vertical gradient from `top` to `bottom` with light pixel noise (a product photo's backdrop)."""
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    gradient = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    noise = np_rng.normal(0.0, 4.0, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8), "RGB")


def pattern_fill(size: int, colour: tuple[int, int, int], pattern: str, period: int, phase: int) -> Image.Image:
    """The product's surface: the colour, with the pattern in a shade of the same colour (so colour stays legible)."""
    light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 150
    second = _mix(colour, (0, 0, 0), 0.45) if light else _mix(colour, (255, 255, 255), 0.55)
    image = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(image)
    half = max(2, period // 2)
    if pattern == "striped":
        for y in range(phase - period, size, period):
            draw.rectangle((0, y, size, y + half - 1), fill=second)
    elif pattern == "diagonal":
        for x in range(phase - size, 2 * size, period):
            draw.line((x, 0, x - size, size), fill=second, width=max(2, period // 3))
    elif pattern == "dotted":
        r = max(1.5, period * 0.24)
        for row, y in enumerate(range(phase - period, size + period, period)):
            for x in range(phase - period + (half if row % 2 else 0), size + period, period):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
    elif pattern == "checked":
        for i, y in enumerate(range(phase - period, size, half)):
            for j, x in enumerate(range(phase - period, size, half)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + half - 1, y + half - 1), fill=second)
    elif pattern == "zigzag":
        for y in range(phase - period, size + period, period):
            points = [(x, y + (half if k % 2 else 0)) for k, x in enumerate(range(-half, size + period, half))]
            draw.line(points, fill=second, width=max(2, period // 4), joint="curve")
    return image


def draw_view(category: str, colour: tuple[int, int, int], pattern: str, size: int, rng: random.Random,
              np_rng: np.random.Generator) -> Image.Image:
    """One photo of a product: its category's silhouette (mask 2x supersampled) at a random pose and scale, filled
    with its colour and pattern, outlined, on a noisy pale gradient background."""
    scale = rng.uniform(0.72, 1.0)
    angle = math.radians(rng.uniform(-14, 14))
    flip = rng.random() < 0.5
    dx, dy = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    bg0, bg1 = rng.sample(BACKGROUNDS, 2)
    big = 2 * size
    cos, sin = math.cos(angle), math.sin(angle)

    def place(x: float, y: float) -> tuple[float, float]:
        u, v = (x - 0.5) * (-1 if flip else 1), y - 0.5
        return (((u * cos - v * sin) * scale + 0.5 + dx) * big, ((u * sin + v * cos) * scale + 0.5 + dy) * big)

    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    for op, polygon in SILHOUETTES[category]:
        draw.polygon([place(x, y) for x, y in polygon], fill=255 if op == "+" else 0)
    mask = mask.reduce(2)

    background = pale_background(size, bg0, bg1, np_rng)

    period = max(6, round(size * scale / 7))
    fill = pattern_fill(size, colour, pattern, period, rng.randrange(period))
    image = Image.composite(fill, background, mask)
    # A one-pixel outline just inside the silhouette keeps white and pale products visible on pale backgrounds.
    inside = mask.point(lambda p: 255 if p > 160 else 0)
    edges = ImageChops.subtract(inside, inside.filter(ImageFilter.MinFilter(3)))
    image.paste(_mix(colour, (0, 0, 0), 0.55), mask=edges)
    return image
