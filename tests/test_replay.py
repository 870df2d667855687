"""Results made before a change open and give the same pixels after it.

``tests/replay/`` was written by the code of commit 041cde3 (before issue 17 rebuilt the rooms):
for each recipe, the PNGs it made (each carrying its own recipe) and its ``?recipe=`` link.
Here every PNG's recipe and every link is read back with today's code and run again.

Pixels are compared with the PNGs themselves; a different CPU (other vector units) may round a
float differently, so one step of 1/255 is allowed per channel, and the mean difference must stay
below 0.05 of a step. On the machine that made them the pixels are equal (the sha256 of each
image's pixels is in ``index.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from composer import engine, registry
from composer.recipe import parse
from composer.sharing.links import decode_recipe
from composer.sharing.pnginfo import read_recipe

HERE = Path(__file__).parent / "replay"
CASES = json.loads((HERE / "index.json").read_text())


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_stored_result_is_made_again_from_its_pngs_and_its_link(name):
    case = CASES[name]
    recipe = parse(case["recipe"], check=registry.check_reference)
    assert decode_recipe(case["link"]) == recipe
    stored = [Image.open(HERE / image["png"]) for image in case["images"]]
    for image, expected in zip(stored, case["images"], strict=True):
        assert (
            hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()
            == (expected["pixels_sha256"])
        )
    # the whole recipe, and the last image alone from the recipe its PNG carries
    again = engine.generate(recipe).images
    alone = engine.generate(read_recipe(stored[-1])).images
    assert read_recipe(stored[-1]).sampler.seed == recipe.sampler.seed + len(stored) - 1
    for made, old in [*zip(again, stored, strict=True), (alone[0], stored[-1])]:
        diff = np.abs(pixels(made) - pixels(old))
        assert diff.max() <= 1 and diff.mean() < 0.05, (name, int(diff.max()), diff.mean())
