import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from toyworld.captions import captions, parse_caption
from toyworld.evaluate import hue_saturation_value
from toyworld.render import (
    BACKGROUND,
    BRIGHTNESS_JITTER,
    CHANNEL_JITTER,
    COLOR_RGB,
    COLORS,
    NATIVE_SIZE,
    SHAPES,
    render,
    render_batch,
)

PAIRS = list(itertools.product(SHAPES, COLORS))


def _coverage(image: np.ndarray) -> np.ndarray:
    """Fraction of each pixel the shape covers: shape and white blend linearly at its edge."""
    distance = 255.0 - np.asarray(image, dtype=np.float64).min(axis=-1)
    return distance / distance.max()


def test_render_is_deterministic_and_seed_dependent():
    first = render("star", "blue", 7)
    assert first.mode == "RGB" and first.size == (NATIVE_SIZE, NATIVE_SIZE)
    assert first.tobytes() == render("star", "blue", 7).tobytes()
    assert first.tobytes() != render("star", "blue", 8).tobytes()
    assert render("star", "blue", 7, size=64).size == (64, 64)


def test_render_is_the_same_in_another_process_with_another_hash_seed():
    code = "from toyworld.render import render; print(render('star', 'green', 3).tobytes().hex())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        check=True,
    )
    assert out.stdout.strip() == render("star", "green", 3).tobytes().hex()


@pytest.mark.parametrize("size", [32, 48, 64])
def test_shapes_stay_inside_the_frame(size):
    images = render_batch(PAIRS * 20, [seed for seed in range(20) for _ in PAIRS], size)
    edges = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert (edges == BACKGROUND).all()


def test_rendered_colour_is_the_named_colour_within_the_jitter():
    for (shape, color), seed in itertools.product(PAIRS, range(5)):
        image = np.asarray(render(shape, color, seed)).astype(int)
        core = image[_coverage(image) > 0.99]
        assert len(core) > 10
        assert (
            np.abs(np.median(core, axis=0) - COLOR_RGB[color]).max()
            <= BRIGHTNESS_JITTER + CHANNEL_JITTER + 1
        )


def test_circles_have_the_promised_radius_range():
    radii = []
    for seed in range(60):
        for color in COLORS:
            area = _coverage(render("circle", color, seed)).sum()
            radii.append(math.sqrt(area / math.pi) / NATIVE_SIZE)
    assert 0.21 < min(radii) < 0.25 and 0.35 < max(radii) < 0.39


def test_colour_hues_are_far_apart_and_gray_is_unsaturated():
    hues = {c: hue_saturation_value(np.array(rgb)) for c, rgb in COLOR_RGB.items()}
    assert hues["gray"][1] == 0.0
    chromatic = [h for c, (h, s, _) in hues.items() if c != "gray" and s > 0.7]
    assert len(chromatic) == len(COLORS) - 1
    for a, b in itertools.combinations(chromatic, 2):
        assert min(abs(a - b), 360 - abs(a - b)) >= 45


def test_render_batch_matches_render():
    pairs = [("circle", "red"), ("star", "gray"), ("square", "purple")]
    batch = render_batch(pairs, [1, 2, 3], size=40)
    assert batch.shape == (3, 40, 40, 3) and batch.dtype == np.uint8
    for image, (shape, color), seed in zip(batch, pairs, [1, 2, 3], strict=True):
        assert (image == np.asarray(render(shape, color, seed, 40))).all()
    with pytest.raises(ValueError, match="one seed per pair"):
        render_batch(pairs, [1, 2])


def test_render_rejects_unknown_names():
    with pytest.raises(ValueError, match="hexagon"):
        render("hexagon", "red", 0)
    with pytest.raises(ValueError, match="orange"):
        render("circle", "orange", 0)


def test_captions_run_from_full_to_empty():
    assert captions("red", "circle") == ["a red circle", "a red shape", "a circle", "a shape"]
    with pytest.raises(ValueError, match="pink"):
        captions("pink", "circle")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle", ("red", "circle")),
        ("a red shape", ("red", None)),
        ("a circle", (None, "circle")),
        ("a shape", (None, None)),
        ("", (None, None)),
        ("A Grey STAR, please.", ("gray", "star")),
        ("a shiny purple triangle on a table", ("purple", "triangle")),
        ("an orange hexagon", (None, None)),
    ],
)
def test_parse_caption(text, expected):
    assert parse_caption(text) == expected


def test_every_caption_parses_back_to_what_it_names():
    for shape, color in PAIRS:
        full, colour_only, shape_only, neither = captions(color, shape)
        assert parse_caption(full) == (color, shape)
        assert parse_caption(colour_only) == (color, None)
        assert parse_caption(shape_only) == (None, shape)
        assert parse_caption(neither) == (None, None)
