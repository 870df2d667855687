"""The toy world: one filled shape on a plain white background, deterministic from a seed.

Shapes are drawn 4× larger with PIL and reduced with a box filter, so edges are anti-aliased the
same way at every size. Size (circumradius 22–38 % of the frame), position (fully inside the
frame, ≥ 1 px margin), rotation (±15°) and colour jitter (±6 in brightness plus ±3 per channel,
so gray stays gray) come from a generator seeded by a SHA-256 of (shape, colour, seed, size), so
every process and machine draws the same. The toy zoo was trained on exactly these images.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star")
COLORS = ("red", "yellow", "green", "blue", "purple", "gray")
BACKGROUND = (255, 255, 255)
NATIVE_SIZE = 32
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),  # hue 0°
    "yellow": (235, 195, 20),  # hue 49°
    "green": (30, 160, 50),  # hue 129°
    "blue": (30, 70, 220),  # hue 227°
    "purple": (140, 40, 190),  # hue 280°
    "gray": (128, 128, 128),
}
STAR_INNER = 0.45
SUPERSAMPLE = 4
BRIGHTNESS_JITTER = 6
CHANNEL_JITTER = 3


def _rng(shape: str, color: str, seed: int, size: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{shape}|{color}|{seed}|{size}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of polygon ``shape`` with circumradius ``r`` around (cx, cy), rotated by ``angle``.

    A square is axis-aligned and a triangle or star points up at ``angle`` = 0.
    """
    if shape == "square":
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        radii = [r] * 4
    elif shape == "triangle":
        corners = [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        radii = [r] * 3
    elif shape == "star":
        corners = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * STAR_INNER for k in range(10)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}; expected square, triangle or star")
    return [
        (cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle))
        for a, rad in zip(corners, radii, strict=True)
    ]


def render(shape: str, color: str, seed: int, size: int = NATIVE_SIZE) -> Image.Image:
    """A ``size``×``size`` RGB image of one ``color`` ``shape``; same arguments, same pixels."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r}; expected one of {', '.join(COLORS)}")
    rng = _rng(shape, color, seed, size)
    r = size * rng.uniform(0.22, 0.38)
    angle = math.radians(rng.uniform(-15.0, 15.0))
    margin = r + 1.0
    cx, cy = rng.uniform(margin, size - margin, size=2)
    shift = rng.integers(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER + 1) + rng.integers(
        -CHANNEL_JITTER, CHANNEL_JITTER + 1, size=3
    )
    rgb = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(COLOR_RGB[color], shift, strict=True))

    s = SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=rgb)
    else:
        draw.polygon([(x * s, y * s) for x, y in outline(shape, cx, cy, r, angle)], fill=rgb)
    return canvas.resize((size, size), Image.Resampling.BOX)


def render_batch(
    pairs: list[tuple[str, str]], seeds: list[int], size: int = NATIVE_SIZE
) -> np.ndarray:
    """``(shape, colour)`` pairs with one seed each → uint8 array (N, size, size, 3)."""
    if len(pairs) != len(seeds):
        raise ValueError(f"{len(pairs)} pairs but {len(seeds)} seeds; give one seed per pair")
    out = np.empty((len(pairs), size, size, 3), dtype=np.uint8)
    for i, ((shape, color), seed) in enumerate(zip(pairs, seeds, strict=True)):
        out[i] = np.asarray(render(shape, color, seed, size))
    return out


SCENE_SEED_OFFSET = 1_000_003


def render_scene(
    left: tuple[str, str], right: tuple[str, str], seed: int, size: int = NATIVE_SIZE
) -> Image.Image:
    """A two-object scene, ``size`` high and ``2·size`` wide: ``left`` = (colour, shape) drawn in
    the left half, ``right`` in the right half, each half exactly a one-object image of the
    world (so a model trained on one object sees familiar halves; only who draws where is new)."""
    (lc, ls), (rc, rs) = left, right
    canvas = Image.new("RGB", (2 * size, size), BACKGROUND)
    canvas.paste(render(ls, lc, seed, size), (0, 0))
    canvas.paste(render(rs, rc, seed + SCENE_SEED_OFFSET, size), (size, 0))
    return canvas
