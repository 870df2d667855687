"""Pictures of AFA's aggregation maps: which expert the aggregator trusted where.

A map is (N, h, w): each expert's weight at every pixel of one aggregation point's features
(``engine.Result.maps``, averaged over the steps). Each expert gets a colour; a pixel's colour is
the weight-mixed colour of the experts, so with two experts red means "expert 1", blue "expert 2"
and purple "both alike". The map is upsampled to the image's size with nearest-neighbour, so the
feature grid stays visible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PALETTE = ((230, 60, 40), (40, 90, 230), (40, 170, 70), (230, 180, 30))
"""Expert 1 red, 2 blue, 3 green, 4 yellow."""
PALETTE_NAMES = ("red", "blue", "green", "yellow")
TITLE_HEIGHT = 18
"""Pixels above each tile for its title (the block's name)."""


def map_image(weights: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """An RGB picture (width, height = ``size``) of a (N, h, w) weight map."""
    n = weights.shape[0]
    if n > len(PALETTE):
        raise ValueError(f"at most {len(PALETTE)} experts can be coloured, not {n}")
    colours = torch.tensor(PALETTE[:n], dtype=torch.float32)  # (N, 3)
    rgb = torch.einsum("nhw,nc->hwc", weights.float().clamp(0, 1), colours)
    picture = Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy())
    return picture.resize(size, Image.Resampling.NEAREST)


def side_by_side(
    image: Image.Image, maps: dict[str, torch.Tensor], points: list[str], titled: bool = False
) -> Image.Image:
    """The image, then the map of each of ``points``, with 2-pixel gaps: in one row, or in two
    when the image is wider than tall (a 64×32 picture and four maps in one row came out as a
    10:1 strip that the page shows a few pixels tall). With ``titled`` each tile has its name
    above it ("image", then the block's)."""
    tiles = [image.convert("RGB"), *(map_image(maps[p], image.size) for p in points)]
    titles = ["image", *points]
    top = TITLE_HEIGHT if titled else 0
    columns = len(tiles) if image.width <= image.height else -(-len(tiles) // 2)
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = image.width + 2, image.height + 2 + top
    grid = Image.new("RGB", (columns * cell_w - 2, rows * cell_h - 2), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(TITLE_HEIGHT - 4)
    for k, tile in enumerate(tiles):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h
        grid.paste(tile, (x, y + top))
        if titled:
            draw.text((x + 2, y + 1), _fit(draw, titles[k], font, image.width - 4), fill=(0, 0, 0),
                      font=font)  # fmt: skip
    return grid


def _font(size: int):
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with "…" until it fits ``width`` pixels."""
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


def expert_share(weights: torch.Tensor) -> list[float]:
    """Each expert's mean weight over the map: a one-line summary of who was trusted."""
    return [round(float(v), 3) for v in np.asarray(weights.float().mean(dim=(1, 2)))]
