"""The analytic evaluator: which colour and which shape an image shows, or ``none``.

No learned weights, so it cannot share a model's blind spots. The background is the median of
the border pixels; the foreground is what differs from it by more than half the image's contrast;
the largest 4-connected component is the object.

Colour: hue, saturation and value of the median of the object's core pixels, matched to the hues
of ``COLOR_RGB`` (low saturation → gray). Blending with a white background keeps the hue, so blur
does not move it.

Shape: angular Fourier moments of the object's soft coverage (anti-aliased and blurred edges
count fractionally), Aₖ = |Σ w·r·e^{ikθ}| / Σ w·r around the centroid. A shape with k-fold
symmetry has nonzero moments only at multiples of k: an equilateral triangle A₃ ≈ 0.42, a square
A₄ ≈ 0.21, a five-pointed star A₅ ≈ 0.46, a disc none. Rotation only changes their phase and blur
only damps them, which is what makes this robust where corner counting is not.

``none`` for both when there is no single clear object (blank, noise, too small, too large,
fragmented); colour ``none`` for a hue far from every colour; shape ``none`` for geometry that
fits no shape.

    python -m toyworld.evaluate DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.render import COLOR_RGB, COLORS, SHAPES

NONE = "none"
MIN_CONTRAST = 40.0  # largest channel difference to the background, out of 255
MIN_AREA, MAX_AREA = 0.015, 0.60  # of the frame
MIN_LARGEST = 0.80  # of the foreground, else fragmented
GRAY_SATURATION = 0.30
GRAY_VALUE = (48.0, 208.0)  # darker or lighter unsaturated objects are no colour of ours
MAX_HUE_ERROR = 30.0  # degrees
ROUND_MAX = 0.05  # A₃…A₅ of a disc, pixel staircase and blur included, stay below this
OVAL_MAX = 0.08  # A₂ of a disc squashed by up to ~10 % stays below this
ROUND_COMPACTNESS = 0.78  # a blurred disc stays above, a star blurred out of its points falls below
MIN_COMPACTNESS = 0.55  # area / (2π·mean r²): disc 1, square 0.95, triangle 0.83, star 0.8
MAX_ASYMMETRY = 0.15  # A₁: none of our shapes is lopsided
POLYGON_MIN = 0.08  # the dominant Aₖ of a polygon, even blurred, exceeds this
DOMINANCE = 0.5  # the other Aⱼ (j = 2…5) of a polygon stay below this fraction of its Aₖ
POLYGONS = {3: "triangle", 4: "square", 5: "star"}
POLYGON_MAX = {"triangle": 0.55, "square": 0.30, "star": 0.65}  # sharp ones: 0.42, 0.21, 0.46


def hue_saturation_value(rgb: np.ndarray) -> tuple[float, float, float]:
    """HSV of one RGB colour (0–255): hue in degrees, saturation in 0–1, value in 0–255."""
    r, g, b = (float(v) for v in rgb)
    hi, lo = max(r, g, b), min(r, g, b)
    saturation = 0.0 if hi <= 0 else (hi - lo) / hi
    if hi == lo:
        hue = 0.0
    elif hi == r:
        hue = (60.0 * (g - b) / (hi - lo)) % 360.0
    elif hi == g:
        hue = 60.0 * (b - r) / (hi - lo) + 120.0
    else:
        hue = 60.0 * (r - g) / (hi - lo) + 240.0
    return hue, saturation, hi


HUES = {
    name: hue_saturation_value(np.array(rgb))[0]
    for name, rgb in COLOR_RGB.items()
    if name != "gray"
}


def color_of(rgb: np.ndarray) -> str:
    """The colour name of one RGB value: nearest hue, gray when unsaturated, else ``none``."""
    hue, saturation, value = hue_saturation_value(rgb)
    if saturation < GRAY_SATURATION:
        return "gray" if GRAY_VALUE[0] <= value <= GRAY_VALUE[1] else NONE
    errors = {name: min(abs(hue - h), 360.0 - abs(hue - h)) for name, h in HUES.items()}
    name = min(errors, key=errors.__getitem__)
    return name if errors[name] <= MAX_HUE_ERROR else NONE


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask.

    Union-find over horizontal runs: two runs in adjacent rows connect when their columns
    overlap. A 32×32 mask has tens of runs, so the Python loop stays cheap.
    """
    h = mask.shape[0]
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    n = len(rows)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))
    for y in range(h - 1):
        i, i_end = row_first[y], row_first[y + 1]
        j, j_end = row_first[y + 1], row_first[y + 2]
        while i < i_end and j < j_end:
            if starts[i] < ends[j] and starts[j] < ends[i]:
                a, b = find(i), find(j)
                if a != b:
                    parent[b] = a
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=ends - starts, minlength=n)
    out = np.zeros_like(mask, dtype=bool)
    for k in np.flatnonzero(roots == np.argmax(sizes)):
        out[rows[k], starts[k] : ends[k]] = True
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2·radius+1)² square: the OR of every shift within ``radius``."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def shape_moments(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """Angular moments A₀…A₅ and compactness of a soft coverage map (weights in 0–1).

    Aₖ = |Σ w·r·e^{ikθ}| / Σ w·r around the weighted centroid; compactness = Σw / (2π·mean r²),
    1 for a disc and lower for anything with corners or holes.
    """
    h, w = weight.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    mass = weight.sum()
    z = (xs - (weight * xs).sum() / mass) + 1j * (ys - (weight * ys).sum() / mass)
    r = np.abs(z)
    unit = np.divide(z, r, out=np.ones_like(z), where=r > 0)
    wr = weight * r
    amplitudes = np.abs([(wr * unit**k).sum() for k in range(6)]) / wr.sum()
    compactness = float(mass / (2.0 * np.pi * (weight * r**2).sum() / mass))
    return amplitudes, compactness


def shape_of(weight: np.ndarray) -> str:
    """The shape of a soft coverage map, from its angular moments, or ``none`` if none fits.

    A cross has 4-fold symmetry too, but a far larger A₄ than a square: hence the upper bounds.
    An empty map (nothing drawn, as in a half of a two-object picture) has no shape.
    """
    if not weight.sum() > 0:
        return NONE
    amplitudes, compactness = shape_moments(weight)
    if amplitudes[1] > MAX_ASYMMETRY or compactness < MIN_COMPACTNESS:
        return NONE
    harmonics = {k: float(amplitudes[k]) for k in (2, 3, 4, 5)}
    if harmonics[2] < OVAL_MAX and max(harmonics[k] for k in POLYGONS) < ROUND_MAX:
        return "circle" if compactness >= ROUND_COMPACTNESS else NONE
    k = max(POLYGONS, key=harmonics.__getitem__)
    shape, strength = POLYGONS[k], harmonics[k]
    rest = max(a for j, a in harmonics.items() if j != k)
    if POLYGON_MIN <= strength <= POLYGON_MAX[shape] and rest <= DOMINANCE * strength:
        return shape
    return NONE


def classify(image: Image.Image | np.ndarray) -> tuple[str, str]:
    """(colour, shape) of the single object in ``image``; ``("none", "none")`` when there is none.

    Accepts a PIL image or a uint8 array of shape (H, W), (H, W, 3) or (H, W, 4).
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    rgb = rgb[..., :3].astype(np.float32)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.abs(rgb - background).max(axis=-1)
    contrast = float(np.percentile(distance, 99))
    if contrast < MIN_CONTRAST:
        return NONE, NONE
    mask = distance > contrast / 2
    obj = largest_component(mask)
    area = int(obj.sum())
    if not MIN_AREA * h * w <= area <= MAX_AREA * h * w or area < MIN_LARGEST * mask.sum():
        return NONE, NONE

    level = float(np.percentile(distance[obj], 90))
    color = color_of(np.median(rgb[obj & (distance >= 0.8 * level)], axis=0))
    floor = float(np.percentile(np.abs(border - background).max(axis=-1), 90))
    halo = _dilate(obj, max(2, round(min(h, w) / 16)))  # where blur spread the object's edge
    weight = np.clip((distance - floor) / max(level - floor, 1.0), 0.0, 1.0) * halo
    return color, shape_of(weight)


def classify_scene(image: Image.Image | np.ndarray) -> tuple[tuple[str, str], tuple[str, str]]:
    """(colour, shape) of the object in the left half and in the right half of a two-object
    scene (``toyworld.render.render_scene``), each half judged as a one-object image."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    half = rgb.shape[1] // 2
    return classify(rgb[:, :half]), classify(rgb[:, half:])


def evaluate_dir(folder: str | Path) -> dict:
    """Classify every ``*.png`` in ``folder`` (sorted by name) and count colours, shapes, pairs.

    ``colors`` and ``shapes`` list every name and ``none``; ``pairs`` lists the "colour shape"
    combinations seen, ``none`` included, so each of the three sums to ``n``.
    """
    images = []
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as im:
            color, shape = classify(im)
        images.append({"path": str(path), "color": color, "shape": shape})
    colors = Counter(i["color"] for i in images)
    shapes = Counter(i["shape"] for i in images)
    pairs = Counter(f"{i['color']} {i['shape']}" for i in images)
    return {
        "n": len(images),
        "colors": {c: colors[c] for c in (*COLORS, NONE)},
        "shapes": {s: shapes[s] for s in (*SHAPES, NONE)},
        "pairs": dict(sorted(pairs.items())),
        "images": images,
    }


def main(argv: list[str] | None = None) -> int:
    """Print the counts for a folder of PNGs, as a table or (``--json``) as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.evaluate",
        description="Count colours and shapes in a folder of PNGs.",
    )
    parser.add_argument("folder", help="folder whose *.png files are classified")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"{args.folder!r} is not a folder")
    result = evaluate_dir(args.folder)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['n']} images in {args.folder}: colour (rows) by shape (columns)")
    table = Counter((i["color"], i["shape"]) for i in result["images"])
    print(f"{'':>8}" + "".join(f"{s:>9}" for s in result["shapes"]) + f"{'total':>9}")
    for color, total in result["colors"].items():
        cells = "".join(f"{table[color, s]:>9}" for s in result["shapes"])
        print(f"{color:>8}{cells}{total:>9}")
    print(
        f"{'total':>8}"
        + "".join(f"{n:>9}" for n in result["shapes"].values())
        + f"{result['n']:>9}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
