"""Aggregation-map pictures (composer/maps.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ui.maps import PALETTE, expert_share, map_image, side_by_side


def test_each_expert_gets_its_colour_and_mixtures_mix():
    weights = torch.zeros(2, 2, 4)
    weights[0, :, :2] = 1.0  # expert 1 on the left half
    weights[1, :, 2:] = 1.0  # expert 2 on the right
    weights[:, 1, 3] = 0.5  # one pixel shared equally
    picture = np.asarray(map_image(weights, (8, 4)))
    assert picture.shape == (4, 8, 3)
    assert tuple(picture[0, 0]) == PALETTE[0] and tuple(picture[0, 7]) == PALETTE[1]
    mixed = tuple((np.array(PALETTE[0]) + np.array(PALETTE[1])) / 2)
    np.testing.assert_allclose(picture[3, 7], mixed, atol=1)
    assert expert_share(weights) == pytest.approx([0.5625, 0.4375], abs=1e-3)


def test_side_by_side_and_too_many_experts():
    image = Image.new("RGB", (6, 6), (255, 255, 255))
    maps = {"mid": torch.full((2, 3, 3), 0.5), "head": torch.ones(2, 6, 6) / 2}
    row = side_by_side(image, maps, ["mid", "head"])
    assert row.size == (6 * 3 + 4, 6)
    assert row.getpixel((6 + 2, 0)) == map_image(maps["mid"], (6, 6)).getpixel((0, 0))
    wide = Image.new("RGB", (12, 6), (0, 0, 0))  # image + 3 maps: two rows of two
    grid = side_by_side(wide, {**maps, "up": torch.ones(2, 3, 6) / 2}, ["mid", "head", "up"])
    assert grid.size == (12 * 2 + 2, 6 * 2 + 2)
    assert grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((0, 8)) != (255, 255, 255)
    with pytest.raises(ValueError, match="at most 4 experts"):
        map_image(torch.ones(5, 2, 2) / 5, (4, 4))
