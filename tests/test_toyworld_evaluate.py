import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from toyworld.evaluate import classify, evaluate_dir, largest_component, main, shape_of
from toyworld.render import COLORS, SHAPES, render

PAIRS = list(itertools.product(SHAPES, COLORS))
ROOT = Path(__file__).resolve().parents[1]


def _accuracy(size: int, seeds: range, blur: float | None = None) -> float:
    right, wrong = 0, Counter()
    for (shape, color), seed in itertools.product(PAIRS, seeds):
        image = render(shape, color, seed, size)
        if blur is not None:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        got = classify(image)
        if got == (color, shape):
            right += 1
        else:
            wrong[(color, shape, *got)] += 1
    total = len(PAIRS) * len(seeds)
    print(f"{size}px blur={blur}: {right}/{total}, misses {dict(wrong)}")
    return right / total


def test_accuracy_on_clean_32px_images():
    assert _accuracy(32, range(1000, 1042)) >= 0.99  # 1,008 images


def test_accuracy_on_clean_64px_images():
    assert _accuracy(64, range(2000, 2010)) >= 0.99  # 240 images


def test_accuracy_on_blurred_32px_images():
    assert _accuracy(32, range(1000, 1042), blur=1.0) >= 0.97


def test_accuracy_with_noise_and_a_colour_cast():
    rng = np.random.default_rng(0)
    right = 0
    for (shape, color), seed in itertools.product(PAIRS, range(5)):
        image = np.asarray(render(shape, color, seed).filter(ImageFilter.GaussianBlur(1.0)), float)
        image = image + rng.uniform(-12, 12, 3) + rng.normal(0, 6, image.shape)
        right += classify(np.clip(image, 0, 255).astype(np.uint8)) == (color, shape)
    assert right >= 0.95 * len(PAIRS) * 5


@pytest.mark.parametrize("value", [0, 128, 255])
def test_blank_images_show_nothing(value):
    assert classify(Image.new("RGB", (32, 32), (value,) * 3)) == ("none", "none")


@pytest.mark.filterwarnings("error")
def test_an_empty_coverage_map_has_no_shape_and_no_division_by_zero():
    assert shape_of(np.zeros((16, 16))) == "none"


@pytest.mark.parametrize("seed", range(6))
def test_noise_images_show_nothing(seed):
    rng = np.random.default_rng(seed)
    assert classify(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) == ("none", "none")
    white_noise = np.clip(255 + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    assert classify(white_noise) == ("none", "none")


def _drawn(*boxes: tuple[int, int, int, int], kind: str = "ellipse") -> Image.Image:
    canvas = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        getattr(draw, kind)([4 * v for v in box], fill=(220, 30, 30))
    return canvas.resize((32, 32), Image.Resampling.BOX)


def test_no_single_clear_object_is_none():
    assert classify(_drawn((2, 2, 12, 12), (18, 18, 29, 29))) == ("none", "none")  # two
    assert classify(_drawn((15, 15, 17, 17))) == ("none", "none")  # a speck
    assert classify(_drawn((1, 1, 31, 31), kind="rectangle")) == ("none", "none")  # everything


def test_geometry_that_fits_no_shape_keeps_its_colour():
    assert classify(_drawn((4, 10, 28, 22))) == ("red", "none")  # a 2:1 ellipse
    assert classify(_drawn((4, 12, 28, 20), kind="rectangle")) == ("red", "none")  # a bar
    cross = _drawn((13, 4, 19, 28), (4, 13, 28, 19), kind="rectangle")
    assert classify(cross) == ("red", "none")


def test_hues_far_from_every_colour_are_none_and_any_background_works():
    def disc(fill, background="white"):
        canvas = Image.new("RGB", (128, 128), background)
        ImageDraw.Draw(canvas).ellipse([24, 24, 104, 104], fill=fill)
        return canvas.resize((32, 32), Image.Resampling.BOX)

    assert classify(disc((30, 200, 210))) == ("none", "circle")  # cyan
    assert classify(disc((230, 40, 160))) == ("none", "circle")  # pink
    assert classify(disc((10, 10, 10))) == ("none", "circle")  # black
    assert classify(disc((30, 160, 50), background="black")) == ("green", "circle")


def test_classify_accepts_arrays_of_any_channel_count():
    image = np.asarray(render("square", "gray", 4))
    rgba = np.concatenate([image, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    assert classify(image) == classify(rgba) == classify(image[..., 0]) == ("gray", "square")


def test_largest_component_is_four_connected():
    mask = np.zeros((8, 8), bool)
    mask[0:2, 0:3] = True  # 6 pixels
    mask[2:4, 3:5] = True  # 4 pixels, touching the 6 only at a corner
    mask[7, 0:7] = True  # 7 pixels: the largest 4-connected component, not the largest 8-connected
    expected = np.zeros_like(mask)
    expected[7, 0:7] = True
    assert (largest_component(mask) == expected).all()
    assert not largest_component(np.zeros((4, 4), bool)).any()


def _write(folder: Path) -> list[tuple[str, str]]:
    labels = [("red", "circle"), ("red", "circle"), ("blue", "star"), ("gray", "triangle")]
    for i, (color, shape) in enumerate(labels):
        render(shape, color, i).save(folder / f"{i:02d}.png")
    Image.new("RGB", (32, 32), "white").save(folder / "99_blank.png")
    (folder / "notes.txt").write_text("not an image")
    return labels


def test_cli_json_counts_colours_shapes_and_pairs(tmp_path):
    _write(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "toyworld.evaluate", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    result = json.loads(out.stdout)
    assert result["n"] == 5
    assert result["colors"] == {
        "red": 2,
        "yellow": 0,
        "green": 0,
        "blue": 1,
        "purple": 0,
        "gray": 1,
        "none": 1,
    }
    assert result["shapes"] == {"circle": 2, "square": 0, "triangle": 1, "star": 1, "none": 1}
    assert result["pairs"] == {"red circle": 2, "blue star": 1, "gray triangle": 1, "none none": 1}
    assert [Path(i["path"]).name for i in result["images"]] == [
        "00.png",
        "01.png",
        "02.png",
        "03.png",
        "99_blank.png",
    ]
    assert result["images"][2] == {
        "path": str(tmp_path / "02.png"),
        "color": "blue",
        "shape": "star",
    }


def test_cli_table_and_errors(tmp_path, capsys):
    _write(tmp_path)
    assert main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "5 images" in table
    red_row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["red"])
    assert red_row == ["red", "2", "0", "0", "0", "0", "2"]
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert evaluate_dir(tmp_path / "missing")["n"] == 0
